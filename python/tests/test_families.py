"""A model of another family (XLM-RoBERTa, from shared/fixtures), streamed
from an in-process weight server one layer at a time, against the vectors of
sentence-transformers."""

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
