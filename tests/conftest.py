"""Shared fixtures: the default synthetic data and tiny local models (built once, as `make data` does)."""

import sys
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


@pytest.fixture
def fake_torchao(monkeypatch):
    """A stand-in for torchao, whose float8 refuses to run on CPUs: `quantize_` with
    `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` replaces a bf16 Linear's weight by its rows
    rounded through e4m3 (each row scaled to e4m3's range), as a plain bf16 tensor. `quantized` counts the calls.
    Like torchao, unless the config says `set_inductor_config=False` it switches Inductor to its recommended options
    (coordinate-descent tuning; restored after the test)."""
    import importlib.machinery
    import types

    import torch

    class PerRow:
        pass

    class Float8DynamicActivationFloat8WeightConfig:
        def __init__(self, granularity, set_inductor_config=True):
            self.granularity = granularity
            self.set_inductor_config = set_inductor_config

    def recommended_inductor_config_setter():
        for name in ("coordinate_descent_tuning", "coordinate_descent_check_all_directions"):
            monkeypatch.setattr(torch._inductor.config, name, True)

    def quantize_(model, config, filter_fn=None, device=None):
        assert isinstance(model, torch.nn.Linear) and isinstance(config.granularity, PerRow)
        if config.set_inductor_config:
            recommended_inductor_config_setter()
        weight = model.weight
        assert weight.dtype == torch.bfloat16, "PerRow quantization only works for bfloat16 precision input weight"
        scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        rounded = (weight.float() / scale).to(torch.float8_e4m3fn).float() * scale
        model.weight = torch.nn.Parameter(rounded.to(weight.dtype), requires_grad=False)
        quantization.quantized += 1

    torchao = types.ModuleType("torchao")
    torchao.__spec__ = importlib.machinery.ModuleSpec("torchao", None)
    quantization = types.ModuleType("torchao.quantization")
    quantization.PerRow, quantization.quantize_ = PerRow, quantize_
    quantization.Float8DynamicActivationFloat8WeightConfig = Float8DynamicActivationFloat8WeightConfig
    quantization.quantized = 0
    torchao.quantization = quantization
    monkeypatch.setitem(sys.modules, "torchao", torchao)
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)
    return quantization
