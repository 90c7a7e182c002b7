"""The caching guide's statistics and controls, on a model streamed from an
in-process weight server."""

import pytest

from conftest import open_model

STATS_KEYS = {
    "total_inferences",
    "total_texts",
    "avg_inference_time",
    "p50_inference_time",
    "p95_inference_time",
    "cache_hit_rate",
    "host_cache_hit_rate",
    "vram_hits",
    "vram_misses",
    "bytes_fetched",
    "bytes_uploaded",
    "evictions",
    "fetches",
    "prefetches_in_time",
    "prefetches_late",
    "passes",
    "uploads_per_pass",
    "bytes_uploaded_per_pass",
    "last_pass_uploads",
    "last_pass_bytes_uploaded",
}
CACHE_KEYS = {
    "cached_components",
    "memory_usage_mb",
    "memory_usage_bytes",
    "budget_bytes",
    "layer_slots",
    "cache_size",
    "cache_hit_rate",
    "host_cache_bytes",
    "host_cache_capacity_bytes",
    "host_window_bytes",
    "staging_bytes",
    "staging_limit_bytes",
    "eviction",
    "weight_dtype",
    "layer_bytes",
    "pinned_bytes",
}


@pytest.fixture(scope="module")
def streamed_model(weight_server):
    return open_model(server=weight_server, cache_size=2, prefetch=1)


@pytest.fixture()
def streamed(streamed_model):
    """The module's model, back to a budget of two layers and an empty cache."""
    streamed_model.cache_size = 2
    streamed_model.clear_cache()
    return streamed_model


def test_stats_and_cache_info_carry_the_guides_keys(streamed, golden):
    texts_before = streamed.get_inference_stats()["total_texts"]
    streamed.encode(golden.sentences[:4])
    stats = streamed.get_inference_stats()
    assert STATS_KEYS <= set(stats), STATS_KEYS - set(stats)
    assert stats["total_texts"] == texts_before + 4
    assert stats["avg_inference_time"] > 0
    assert 0.0 <= stats["cache_hit_rate"] <= 1.0
    info = streamed.get_cache_info()
    assert CACHE_KEYS <= set(info), CACHE_KEYS - set(info)
    assert info["cached_components"][0] == "embeddings"
    assert info["memory_usage_mb"] == pytest.approx(info["memory_usage_bytes"] / 2**20)
    assert info["eviction"] == "optimal" and info["weight_dtype"] == "f32"


def test_cache_size_changes_at_run_time(streamed, golden):
    streamed.encode(golden.sentences[:2])
    assert streamed.cache_size == 2
    streamed.cache_size = 6
    assert streamed.get_cache_info()["cache_size"] == 6
    streamed.encode(golden.sentences[:2])
    # Every layer now stays resident: the next pass uploads nothing.
    golden.assert_matches(streamed.encode(golden.sentences[:2]), rows=[0, 1])
    assert streamed.get_inference_stats()["last_pass_uploads"] == 0
    streamed.cache_size = 1
    assert len(streamed.get_cache_info()["cached_components"]) <= 2
    golden.assert_matches(streamed.encode(golden.sentences[2:4]), rows=[2, 3])
    streamed.vram_budget_mb = 64
    assert streamed.vram_budget_mb == 64


def test_clear_cache_empties_gpu_memory_and_the_next_call_refetches(streamed, golden):
    streamed.encode(golden.sentences[:2])
    streamed.clear_cache()
    info = streamed.get_cache_info()
    assert info["cached_components"] == ["embeddings"]
    assert info["host_cache_bytes"] == 0
    fetched = streamed.get_inference_stats()["bytes_fetched"]
    golden.assert_matches(streamed.encode(golden.sentences[:2]), rows=[0, 1])
    assert streamed.get_inference_stats()["bytes_fetched"] > fetched


def test_warmup_loads_the_layers_it_is_given(streamed):
    streamed.warmup([0, 1])
    assert streamed.get_cache_info()["cached_components"] == [
        "embeddings",
        "encoder.layer.0",
        "encoder.layer.1",
    ]
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        streamed.warmup([9])
