"""The FP8 conversion's own logic, on the CPU with a torchao stand-in (`fake_torchao`): torchao's float8 runs
only on GPUs with FP8 tensor cores, where bench/stage1.py measures the real thing."""

import sys

import pytest
import torch
from torch import nn

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.fp8 import Float8InferenceLinear, convert_linears_to_fp8, require_fp8_support


def frozen_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).requires_grad_(False).to(torch.bfloat16)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def test_converted_layers_multiply_with_the_float8_weight(fake_torchao):
    model = frozen_mlp()
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    reference = model(x)
    assert convert_linears_to_fp8(model) == 2
    assert all(isinstance(model[i], Float8InferenceLinear) for i in (0, 2))
    out = model(x)
    assert fake_torchao.quantized == 2
    assert out.shape == reference.shape and out.dtype == torch.bfloat16
    assert 0 < relative_error(out, reference) < 0.1
    model(x)
    assert fake_torchao.quantized == 2  # unchanged weights are not quantised again


def test_parameters_and_state_dict_are_unchanged_and_loading_weights_requantises(fake_torchao):
    model = frozen_mlp(0)
    parameters = [(name, id(p), p.requires_grad) for name, p in model.named_parameters()]
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    convert_linears_to_fp8(model)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    before = model(x)
    assert [(name, id(p), p.requires_grad) for name, p in model.named_parameters()] == parameters
    assert list(model.buffers()) == []
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())
    other = frozen_mlp(1)
    model.load_state_dict(other.state_dict())
    assert relative_error(model(x), other(x)) < 0.1
    assert relative_error(model(x), before) > 0.5


def test_only_frozen_linears_with_aligned_dims_are_converted(fake_torchao):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10), nn.Linear(64, 64), nn.LayerNorm(64))
    model.requires_grad_(False).to(torch.bfloat16)
    model[2].requires_grad_(True)
    assert convert_linears_to_fp8(model) == 1
    assert isinstance(model[0], Float8InferenceLinear)
    assert type(model[1]) is nn.Linear and type(model[2]) is nn.Linear and type(model[3]) is nn.LayerNorm
    with pytest.raises(ConfigError, match="multiple of 16"):
        convert_linears_to_fp8(nn.Sequential(nn.Linear(10, 20)).requires_grad_(False).to(torch.bfloat16))
    with pytest.raises(ConfigError, match="frozen"):
        Float8InferenceLinear(nn.Linear(16, 16))


def test_fp32_weights_are_refused_with_the_setting_to_change(fake_torchao):
    with pytest.raises(ConfigError, match="frozen_dtype: bfloat16"):
        convert_linears_to_fp8(nn.Sequential(nn.Linear(16, 16)).requires_grad_(False))


def test_fp8_support_needs_torchao_and_a_gpu_with_fp8_tensor_cores(fake_torchao, monkeypatch):
    with pytest.raises(ConfigError, match=r"model.vision_fp8 needs a CUDA GPU .* this run is on cpu; or set model.vision_fp8: false"):
        require_fp8_support(torch.device("cpu"), "model.vision_fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="this run is on cpu"):
            require_fp8_support(None, "model.vision_fp8")  # None: whatever this process would use
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match=r"A100 \(compute capability 8.0\) has no FP8 tensor cores"):
        require_fp8_support(torch.device("cuda", 0), "model.vision_fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    require_fp8_support(torch.device("cuda", 0), "model.vision_fp8")
    monkeypatch.setitem(sys.modules, "torchao", None)  # not installed
    with pytest.raises(ConfigError, match=r"needs torchao, which is not installed: pip install torchao==0\.18\.0"):
        require_fp8_support(torch.device("cuda", 0), "model.vision_fp8")


def test_converting_leaves_inductors_settings_as_they_were(fake_torchao):
    """torchao's default switches Inductor to coordinate-descent tuning, under which compiling the FP8 ViT-g
    outlasted a GPU call: compile must stay as quick as without FP8."""
    import torch._inductor.config as inductor

    before = (inductor.coordinate_descent_tuning, inductor.coordinate_descent_check_all_directions)
    model = frozen_mlp()
    convert_linears_to_fp8(model)
    model(torch.randn(2, 64, dtype=torch.bfloat16))
    assert fake_torchao.quantized == 2
    assert (inductor.coordinate_descent_tuning, inductor.coordinate_descent_check_all_directions) == before == (False, False)
