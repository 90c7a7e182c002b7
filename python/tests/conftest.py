"""Shared fixtures: where the model and the golden vectors are, models opened
once per session, and the GPU skip that the Rust tests also follow."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import surfing_weights


def repo_root() -> Path:
    """The checkout: `SURF_REPO_ROOT` when set, else the folder above python/."""
    named = os.environ.get("SURF_REPO_ROOT")
    return Path(named) if named else Path(__file__).resolve().parents[2]


def golden_dir() -> Path:
    """`shared/golden` beside the checkout, unless `SURF_GOLDEN_DIR` names it."""
    named = os.environ.get("SURF_GOLDEN_DIR")
    folder = Path(named) if named else repo_root() / ".." / "shared" / "golden"
    assert (folder / "dev-sentences.txt").is_file(), (
        f"{folder} is missing: the reference embeddings live in shared/golden beside the checkout"
    )
    return folder


def minilm_dir() -> Path:
    folder = repo_root() / "assets" / "models" / "all-MiniLM-L6-v2"
    assert (folder / "model.safetensors").is_file(), (
        f"{folder} is missing: run `bash assets/fetch-model.sh` first"
    )
    return folder


def open_model(**kwargs) -> surfing_weights.StreamingModel:
    """A model, or a skipped test where no GPU adapter exists (a failure under CI=true)."""
    try:
        return surfing_weights.StreamingModel(**kwargs)
    except RuntimeError as error:
        if "no GPU adapter found" in str(error) and os.environ.get("CI") != "true":
            pytest.skip(f"no GPU adapter: {error}")
        raise


def fixture_dir(name: str) -> Path:
    """A model of another family in `shared/fixtures`, unless `SURF_FIXTURES_DIR` names the folder."""
    named = os.environ.get("SURF_FIXTURES_DIR")
    folder = (Path(named) if named else golden_dir() / ".." / "fixtures") / name
    assert (folder / "reference.json").is_file(), (
        f"{folder} is missing: the fixtures live in shared/fixtures beside the checkout"
    )
    return folder


class Golden:
    """The dev sentences and one reference's token ids and vectors for them."""

    def __init__(self, reference: Path):
        text = (golden_dir() / "dev-sentences.txt").read_text(encoding="utf-8")
        # One input per line, the empty line kept; the file ends with a newline.
        self.sentences = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
        data = json.loads(reference.read_text(encoding="utf-8"))
        self.ids = [item["ids"] for item in data["items"]]
        self.vectors = np.array([item["embedding"] for item in data["items"]], dtype=np.float64)
        assert len(self.sentences) == len(self.ids)

    def assert_matches(self, vectors: np.ndarray, rows=None, min_cosine: float = 0.9999) -> float:
        """Cosine of every row against its golden vector; returns the lowest."""
        rows = list(range(len(self.sentences))) if rows is None else list(rows)
        assert vectors.shape == (len(rows), self.vectors.shape[1])
        expected = self.vectors[rows]
        got = vectors.astype(np.float64)
        cosines = (got * expected).sum(axis=1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
        )
        worst = float(cosines.min())
        assert worst >= min_cosine, f"lowest cosine {worst} (row {rows[int(cosines.argmin())]})"
        return worst


@pytest.fixture(scope="session")
def golden() -> Golden:
    return Golden(golden_dir() / "minilm-dev.candle.json")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def local_model(model_dir):
    return open_model(model_path=model_dir)


@pytest.fixture(scope="session")
def weight_server(model_dir):
    with surfing_weights.WeightServer(model_dir) as server:
        yield server
