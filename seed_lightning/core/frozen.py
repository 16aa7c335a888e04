"""The dtype frozen weights are held in, chosen from the Trainer's precision (one rule for both modules)."""

from typing import Literal

import torch

from seed_lightning.core.errors import ConfigError

FrozenDtype = Literal["auto", "float32", "bfloat16"]


def resolve_frozen_dtype(setting: FrozenDtype, precision: str, single_dtype_shards: bool = False) -> torch.dtype:
    """"auto" -> bfloat16 under a bf16 precision (mixed or true), else float32; an explicit name as given.

    `single_dtype_shards`: the strategy flattens frozen and trained weights into one tensor (FSDP with
    LoRA), so frozen weights must keep the trained ones' float32.
    """
    if setting == "auto":
        setting = "bfloat16" if str(precision).startswith("bf16") and not single_dtype_shards else "float32"
    elif setting != "float32" and single_dtype_shards:
        raise ConfigError("model.frozen_dtype: FSDP flattens each layer's LoRA (fp32) and frozen weights into one "
                          "tensor of one dtype; use frozen_dtype: float32 (or auto) with FSDP")
    if setting not in ("float32", "bfloat16"):
        raise ConfigError(f"model.frozen_dtype must be auto, float32 or bfloat16, got {setting!r}")
    return getattr(torch, setting)
