"""Shared fixtures: the default synthetic data and tiny local models (built once, as `make data` does)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_world() -> SimpleNamespace:
    from devkit.synthetic import generate
    from devkit.tiny_models import build_all

    data, models = REPO / "data" / "synthetic", REPO / "data" / "models"
    if not (data / "stats.json").exists():
        generate(data)
    build_all(data / "corpus.txt", models)  # skips what is already built
    return SimpleNamespace(repo=REPO, data=data, models=models, shards=data / "shards")


@pytest.fixture
def no_java(tmp_path, monkeypatch):
    """A PATH without `java` (the answer is cached per process: cleared around the test)."""
    from seed_lightning.mllm import captions

    empty = tmp_path / "bin-without-java"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    captions._java_problem.cache_clear()
    yield
    captions._java_problem.cache_clear()
