"""A model of another family (XLM-RoBERTa, from shared/fixtures), streamed
from an in-process weight server one layer at a time, against the vectors of
sentence-transformers."""

import pytest
import surfing_weights
from conftest import Golden, fixture_dir, open_model


def test_an_xlm_roberta_fixture_streamed_one_layer_at_a_time_matches_sentence_transformers():
    folder = fixture_dir("xlmr")
    reference = Golden(folder / "reference.json")
    with surfing_weights.WeightServer(folder) as server:
        model = open_model(server=server, cache_size=1)
        reference.assert_matches(model.encode(reference.sentences))
        tokens = model.tokenize(reference.sentences)
        for row, expected in enumerate(reference.ids):
            assert tokens["input_ids"][row, : len(expected)].tolist() == expected
        assert model.get_cache_info()["cache_size"] == 1


def test_the_qwen3_query_prompt_by_name_or_as_text_matches_sentence_transformers():
    folder = fixture_dir("qwen3")
    reference = Golden(folder / "reference-prompt-query.json")
    model = open_model(model_path=str(folder))
    reference.assert_matches(model.encode(reference.sentences, prompt_name="query"))
    instruction = "Instruct: Given a web search query, retrieve relevant passages\nQuery:"
    reference.assert_matches(model.encode(reference.sentences[:3], prompt=instruction), rows=range(3))
    with pytest.raises(ValueError, match="document, query"):
        model.encode(["a text"], prompt_name="passage")
