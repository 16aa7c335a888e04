import pytest
import torch
from torch import nn

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.fp8 import Fp8Linear, convert_linears_to_fp8, quantize_rows


def frozen_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).requires_grad_(False)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def test_quantize_rows_uses_the_full_e4m3_range_of_each_row():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 1e5])[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((5,), 448.0))
    assert relative_error(q.float() * scale, x) < 0.05  # e4m3: 3 mantissa bits


def test_fp8_linear_matches_the_linear_within_fp8_error():
    model = frozen_mlp()
    x = torch.randn(3, 7, 64)
    reference = model(x)
    assert convert_linears_to_fp8(model) == 2
    assert all(isinstance(model[i], Fp8Linear) for i in (0, 2))
    out = model(x)
    assert out.shape == reference.shape and out.dtype == torch.bfloat16
    assert 0 < relative_error(out, reference) < 0.1


def test_per_token_scales_keep_small_tokens_accurate_beside_a_huge_one():
    model = frozen_mlp()
    x = torch.randn(8, 64)
    x[0] *= 1e4  # one outlier token: a single per-tensor scale would round the others to zero
    reference = model[0](x)
    convert_linears_to_fp8(model)
    out = model[0](x)
    assert relative_error(out[1:], reference[1:]) < 0.06


def test_state_dict_is_unchanged_and_loading_weights_requantises():
    model = frozen_mlp(0)
    keys = list(model.state_dict())
    convert_linears_to_fp8(model)
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 64)
    before = model(x)
    other = frozen_mlp(1)
    model.load_state_dict(other.state_dict())
    assert relative_error(model(x), other(x)) < 0.1
    assert relative_error(model(x), before.float()) > 0.5


def test_only_frozen_linears_with_aligned_dims_are_converted():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10), nn.Linear(64, 64)).requires_grad_(False)
    model[2].requires_grad_(True)
    assert convert_linears_to_fp8(model) == 1
    assert isinstance(model[0], Fp8Linear) and type(model[1]) is nn.Linear and type(model[2]) is nn.Linear
    with pytest.raises(ConfigError, match="multiple of 16"):
        convert_linears_to_fp8(nn.Sequential(nn.Linear(10, 20)).requires_grad_(False))
    with pytest.raises(ConfigError, match="frozen"):
        Fp8Linear(nn.Linear(16, 16))
