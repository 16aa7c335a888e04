"""Runs a bench script's `main` in its tiny CPU form (`--tiny`): what a GPU call would run, at toy sizes."""

import json

import pytest

from tests.conftest import REPO


@pytest.fixture
def run_bench(monkeypatch, tmp_path, default_world):
    """`run_bench(name, *args)` -> the records bench/NAME.py reported (its results.jsonl), run with `--tiny`."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # the benches import their `common` as scripts do
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))
    import common

    scale = dict(vars(common.SCALE))  # `--tiny` switches the shared scale: back to the paper's after the test
    monkeypatch.setattr(common, "DATE", "test")

    def run(name: str, *args: str) -> list[dict]:
        module = __import__(name)
        module.main(["--tiny", *args])
        return [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]

    yield run
    vars(common.SCALE).update(scale)


@pytest.fixture
def fp8_on_the_cpu(fake_torchao, monkeypatch):
    """torchao's float8 as `fake_torchao` rounds it, allowed on the CPU (the real one needs FP8 tensor cores)."""
    from seed_lightning.core import fp8
    from seed_lightning.tokenizer import module

    for owner in (fp8, module):
        monkeypatch.setattr(owner, "require_fp8_support", lambda device, option: None)
    return fake_torchao
