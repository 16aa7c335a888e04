"""FP8 (e4m3) inference for frozen linear layers, through torchao's float8.

A frozen tower's `nn.Linear`s can run their products in FP8 on GPUs with FP8 tensor cores (compute
capability 8.9+: Ada, Hopper). torchao (an optional dependency: `pip install 'seed-lightning[fp8]'`)
makes an e4m3 copy of each weight with one scale per output channel and, at run time, scales each
activation row (token) and multiplies with `torch._scaled_mm` into bf16; per-token scales keep a
token with large activations from flattening every other token to zero. Compile the tower so that
the activation scaling fuses into the LayerNorm/GELU before each product, otherwise it costs more
than FP8 saves.

The converted layers keep their bf16 `weight`/`bias` parameters: state dicts, checkpoints and exported
models stay full precision and load without torchao; the e4m3 copy is remade whenever the weight
changes (a checkpoint loaded, a device move). torchao's `quantize_` would by default also switch Inductor to
coordinate-descent tuning for the rest of the process, which made compiling the FP8 ViT-g outlast a 5-minute
GPU call; the conversion asks it to leave Inductor's settings as they are.
"""

import importlib.util

import torch
from torch import nn
from torch.nn import functional as F

from seed_lightning.core.errors import ConfigError

TORCHAO_PIN = "torchao==0.18.0"
"""The torchao release the FP8 path was measured with (setup.cfg's `fp8` extra)."""
MIN_CAPABILITY = (8, 9)
"""CUDA compute capability of the first GPUs with FP8 tensor cores (Ada; Hopper is 9.0)."""
_ALIGN = 16  # FP8 matmuls need both dims of the weight to be multiples of 16


def require_fp8_support(device: torch.device | None, option: str) -> None:
    """ConfigError unless torchao is installed and `device` (None: the CUDA GPU this process would use, if any)
    is a CUDA GPU with FP8 tensor cores. `option` names the user's knob in the message."""
    switch_off = f"or set {option}: false"
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"{option} needs torchao, which is not installed: pip install {TORCHAO_PIN} "
                          f"(or pip install 'seed-lightning[fp8]'), {switch_off}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        raise ConfigError(f"{option} needs a CUDA GPU with FP8 tensor cores (H100/H200, Ada; compute capability "
                          f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+), but this run is on {device.type}; {switch_off}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"{option}: {torch.cuda.get_device_name(device)} (compute capability {capability[0]}."
                          f"{capability[1]}) has no FP8 tensor cores (needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: "
                          f"H100/H200, Ada); {switch_off}")


def float8_weight(weight: torch.Tensor) -> torch.Tensor:
    """torchao's float8 form of a bf16 weight [out, in]: e4m3, one scale per output channel (row); `F.linear` on
    it scales each activation row at run time. Made by torchao's own `quantize_`, on a stand-in layer."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    stand_in = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    stand_in.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(stand_in, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    return stand_in.weight.detach()  # detached: a plain tensor attribute, never a parameter of the caller


class Float8InferenceLinear(nn.Module):
    """Drop-in for a frozen bf16 `nn.Linear` at inference: the same `weight`/`bias` parameters (so the same
    state dict), multiplied through torchao's float8 copy of the weight, `weight_fp8`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.weight.requires_grad:
            raise ConfigError("FP8 is for frozen layers: the weight must have requires_grad False")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # A plain attribute, not a buffer: no state dict, no DDP buffer broadcast, no dtype casts by Module.to.
        self.weight_fp8: torch.Tensor | None = None
        self._quantized_from: tuple | None = None

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        return linear.in_features % _ALIGN == 0 and linear.out_features % _ALIGN == 0

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-make the float8 weight if the weight changed since the last call (cheap when it did not)."""
        source = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if source == self._quantized_from:
            return
        with torch.autocast(self.weight.device.type, enabled=False):
            self.weight_fp8 = float8_weight(self.weight)
        self._quantized_from = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_fp8 is None:  # called on its own, not through the converted root's pre-hook
            self.refresh()
        return F.linear(x, self.weight_fp8, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _refresh_all(module: nn.Module, _args) -> None:
    for child in module.modules():
        if isinstance(child, Float8InferenceLinear):
            child.refresh()


def convert_linears_to_fp8(root: nn.Module) -> int:
    """Replace every frozen `nn.Linear` under `root` whose dims allow it by a `Float8InferenceLinear`; their float8
    weights are (re)made before each forward of `root` when needed. Returns how many were replaced.

    Register on an uncompiled `root` (compile the tower inside it), so the check runs eagerly.
    """
    replaced = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad and Float8InferenceLinear.supports(child):
                if child.weight.dtype != torch.bfloat16:
                    raise ConfigError(
                        f"FP8: the frozen weights are {child.weight.dtype}, but torchao's per-channel FP8 takes "
                        "bfloat16 ones; set model.frozen_dtype: bfloat16 (or auto under a bf16 trainer.precision)"
                    )
                setattr(parent, name, Float8InferenceLinear(child))
                replaced += 1
    if replaced == 0:
        raise ConfigError(
            f"FP8: no frozen nn.Linear under {type(root).__name__} has both dims a multiple of {_ALIGN}; "
            "turn FP8 off for this model"
        )
    root.register_forward_pre_hook(_refresh_all)
    return replaced
