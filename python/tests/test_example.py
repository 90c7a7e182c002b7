"""examples/caching.py runs as the README shows it: the monitoring loop over
the default model, streamed from a weight server in the process."""

import os
import subprocess
import sys

import pytest

from conftest import repo_root


def test_the_caching_example_prints_hit_rates_memory_and_the_low_hit_rate_warning():
    finished = subprocess.run(
        [sys.executable, "examples/caching.py", "--rounds", "2", "--cache-size", "2"],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if "no GPU adapter found" in finished.stderr and os.environ.get("CI") != "true":
        pytest.skip("no GPU adapter")
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[0].startswith("round 1: hit rate 0.00"), lines
    assert "GPU memory" in lines[0] and "encoder.layer." in lines[0]
    assert any("warning: cache hit rate" in line for line in lines), lines
    assert lines[-1] == "after clear_cache(): ['embeddings']"
