"""FP8 (e4m3) inference for frozen linear layers.

A frozen tower's `nn.Linear`s can run their products in FP8 on Hopper/Ada GPUs: each weight row
(output channel) is scaled into e4m3's range once, each activation row (token) at run time, and
`torch._scaled_mm` multiplies with those scales and returns bf16. Per-token scales keep a token with
large activations from flattening every other token to zero. The activation scaling is a few
elementwise ops; compile the tower so that they fuse into the LayerNorm/GELU before each product,
otherwise they cost more than FP8 saves.
"""

import torch
from torch import nn

from seed_lightning.core.errors import ConfigError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
_ALIGN = 16  # _scaled_mm needs both matrix dims of the weight to be multiples of 16


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1]) with x ~= q * scale, each row using e4m3's full range."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


class Fp8Linear(nn.Module):
    """Drop-in for a frozen `nn.Linear` at inference: keeps the same `weight`/`bias` parameters (state
    dicts and checkpoints are unchanged) and multiplies with an e4m3 copy of the weight, re-made
    whenever the weight changes (loading a checkpoint, moving devices)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.weight.requires_grad:
            raise ConfigError("Fp8Linear is for frozen layers: the weight must have requires_grad False")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("weight_fp8", None, persistent=False)
        self.register_buffer("weight_scale", None, persistent=False)
        self.register_buffer("bias_bf16", None, persistent=False)
        self._quantized_from: tuple | None = None

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        return linear.in_features % _ALIGN == 0 and linear.out_features % _ALIGN == 0

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-quantise the weight if it changed since the last call (cheap when it did not)."""
        source = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if source == self._quantized_from:
            return
        q, scale = quantize_rows(self.weight)
        self.weight_fp8, self.weight_scale = q, scale.t().contiguous()  # scale_b of _scaled_mm: [1, N]
        self.bias_bf16 = None if self.bias is None else self.bias.to(torch.bfloat16)
        self._quantized_from = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_fp8 is None:  # called on its own, not through the converted root's pre-hook
            self.refresh()
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16
        )
        if self.bias_bf16 is not None:
            out = out + self.bias_bf16
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def require_fp8_support(device: torch.device) -> None:
    """ConfigError on a CUDA GPU without FP8 tensor cores (before Ada/Hopper); the CPU runs _scaled_mm slowly."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"FP8: {torch.cuda.get_device_name(device)} has no FP8 tensor cores (needs H100/H200/Ada); "
                          "turn FP8 off (vision_fp8: false)")


def _refresh_all(module: nn.Module, _args) -> None:
    for child in module.modules():
        if isinstance(child, Fp8Linear):
            child.refresh()


def convert_linears_to_fp8(root: nn.Module) -> int:
    """Replace every frozen `nn.Linear` under `root` whose dims allow it by an `Fp8Linear`; the e4m3
    weights are (re)made before each forward of `root` when needed. Returns how many were replaced."""
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad and Fp8Linear.supports(child):
                setattr(parent, name, Fp8Linear(child))
                replaced += 1
    if replaced == 0:
        raise ConfigError(
            f"FP8: no frozen nn.Linear under {type(root).__name__} has both dims a multiple of {_ALIGN}; "
            "turn FP8 off for this model"
        )
    root.register_forward_pre_hook(_refresh_all)
    return replaced
