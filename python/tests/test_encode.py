"""Vectors against the golden file: from a folder, from an in-process weight
server under a budget of two layers, and from the default model."""

import asyncio
import threading

import numpy as np
import pytest

import surfing_weights
from conftest import open_model, repo_root


def test_a_local_folder_matches_the_golden_vectors(local_model, golden):
    vectors = local_model.encode(golden.sentences)
    assert vectors.dtype == np.float32
    assert vectors.shape == (16, 384)
    golden.assert_matches(vectors)
    tokens = local_model.tokenize(golden.sentences)
    for row, expected in enumerate(golden.ids):
        assert tokens["input_ids"][row, : len(expected)].tolist() == expected
        assert tokens["attention_mask"][row].sum() == len(expected)


def test_one_string_gives_one_vector_and_lists_come_back_in_input_order(local_model, golden):
    single = local_model.encode(golden.sentences[3])
    assert single.shape == (384,) and single.dtype == np.float32
    golden.assert_matches(single[None, :], rows=[3])
    reordered = [5, 0, 15, 8]
    golden.assert_matches(
        local_model.encode([golden.sentences[i] for i in reordered], batch_size=2), rows=reordered
    )
    assert local_model.encode([]).shape == (0, 384)


def test_encode_options(local_model, golden, capsys):
    as_lists = local_model.encode(golden.sentences[:2], convert_to_numpy=False)
    assert isinstance(as_lists, list) and len(as_lists) == 2 and len(as_lists[0]) == 384
    golden.assert_matches(np.array(as_lists, dtype=np.float32), rows=[0, 1])
    normalized = local_model.encode(golden.sentences[:3], normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    with_bar = local_model.encode(golden.sentences[:5], batch_size=2, show_progress_bar=True)
    golden.assert_matches(with_bar, rows=range(5))
    # tqdm when installed (the test extra installs it), else a line per batch.
    progress = capsys.readouterr().err
    assert "5/5" in progress, progress
    assert local_model.dimension == 384
    assert local_model.max_seq_length == 256
    assert local_model.num_layers == 6


def test_an_in_process_weight_server_under_two_layers_matches_the_golden_vectors(
    weight_server, golden
):
    model = open_model(server=weight_server, cache_size=2)
    golden.assert_matches(model.encode(golden.sentences))
    info = model.get_cache_info()
    assert info["cache_size"] == 2
    assert len(info["cached_components"]) <= 3, info["cached_components"]
    stats = model.get_inference_stats()
    assert stats["bytes_fetched"] > 0
    assert stats["evictions"] > 0


def test_an_address_with_its_certificate_as_pem_text(weight_server, golden):
    model = open_model(server=weight_server.address, server_cert=weight_server.cert_pem, cache_size=3)
    golden.assert_matches(model.encode(golden.sentences[:4]), rows=range(4))


def test_neither_folder_nor_server_streams_the_default_model(golden, monkeypatch):
    monkeypatch.chdir(repo_root())
    assert surfing_weights.StreamingBertModel is surfing_weights.StreamingModel
    model = open_model()
    golden.assert_matches(model.encode(golden.sentences[:3]), rows=range(3))
    assert model.get_inference_stats()["bytes_fetched"] > 0


def test_eight_threads_encode_at_once_with_correct_vectors(local_model, golden):
    results = {}
    errors = []

    def work(thread):
        rows = [(thread * 2 + k) % 16 for k in range(3)]
        try:
            for _ in range(2):
                results.setdefault(thread, []).append(
                    (rows, local_model.encode([golden.sentences[i] for i in rows]))
                )
        except Exception as error:  # reported below, with the thread's number
            errors.append((thread, error))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(results) == list(range(8))
    for runs in results.values():
        for rows, vectors in runs:
            golden.assert_matches(vectors, rows=rows)


def test_encode_async_runs_on_a_worker_thread(local_model, golden):
    async def both():
        return await asyncio.gather(
            local_model.encode_async(golden.sentences[:2]),
            local_model.encode_async(golden.sentences[2]),
        )

    pair, single = asyncio.run(both())
    golden.assert_matches(pair, rows=[0, 1])
    golden.assert_matches(single[None, :], rows=[2])


def test_a_weight_server_starts_and_stops(model_dir):
    server = surfing_weights.WeightServer(model_dir, cache_size_mb=64)
    assert not server.is_running
    with pytest.raises(RuntimeError, match="not running"):
        server.address
    with server as running:
        assert running.is_running
        host, port = running.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert running.cert_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert not server.is_running
    server.stop()
