"""Optimiser parameter groups, the warm-up + cosine learning-rate schedule used by every stage, and
`AdamWModule`, the LightningModule base that wires them (and gradient clipping, and the RNG states in
checkpoints) into Lightning."""

import math
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.rng import restore_rng_states, save_rng_states
from seed_lightning.core.tensorboard import LEARNING_RATE_TAG


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, stepped once per optimiser step."""

    lr: float = 1e-4
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_start_lr: float = 1e-6
    """Learning rate at step 0; warm-up rises linearly from here to `lr`."""
    warmup_steps: int = 2000
    """Warm-up length in optimiser steps (ignored when `warmup_ratio` is set)."""
    warmup_ratio: float | None = None
    """Warm-up length as a fraction of all training steps (e.g. 0.03); overrides `warmup_steps`."""
    weight_decay: float = 0.05
    """Decoupled weight decay for matrices; biases, norms and other 1-D parameters get none."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    fused: bool | None = None
    """Use the fused CUDA AdamW kernel; None picks it automatically when every parameter is on CUDA."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # LayerNorm weights/biases, biases and scalars (temperature) are 1-D or 0-D.
    return param.ndim < 2 or name.endswith(".bias")


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed and an undecayed group; frozen ones never enter."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _no_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("no trainable parameters: check which parts the stage freezes")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    groups = parameter_groups(module, config.weight_decay)
    fused = config.fused
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)


def warmup_steps(config: OptimConfig, total_steps: int) -> int:
    if config.warmup_ratio is not None:
        return int(config.warmup_ratio * total_steps)
    return min(config.warmup_steps, max(total_steps - 1, 0))


def learning_rate(step: int, total_steps: int, config: OptimConfig) -> float:
    """The learning rate at optimiser step `step` (0-based) of `total_steps`."""
    warm = warmup_steps(config, total_steps)
    if step < warm:
        return config.warmup_start_lr + (config.lr - config.warmup_start_lr) * step / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    """A per-step LambdaLR following `learning_rate`, in the dict form Lightning expects; LearningRateMonitor shows
    it among the training charts (`train/lr`, one chart per parameter group)."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, total_steps, config) / config.lr
    )
    return {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": LEARNING_RATE_TAG}


class AdamWModule(L.LightningModule):
    """Base of the SEED LightningModules: AdamW + warm-up/cosine from `self.optim_config` (set it in
    `__init__`), `Trainer(gradient_clip_val=...)` clipping that also works with the fused AdamW and FSDP, and
    every rank's RNG states in each checkpoint (a resumed run draws the same dropout masks). Subclasses that
    override the checkpoint hooks call `super()`."""

    optim_config: OptimConfig

    def configure_optimizers(self):
        optimizer = build_optimizer(self, self.optim_config)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": build_scheduler(optimizer, self.optim_config, total)}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        precision = self.trainer.precision_plugin
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
        # Lightning refuses two cases that the paper configs meet: an optimiser that would unscale fp16
        # gradients in its step (fused AdamW) under AMP, and norm clipping under FSDP (a rank's shards hold
        # part of the norm).
        fused_amp = getattr(optimizer, "_step_supports_amp_scaling", False) and isinstance(
            precision, (MixedPrecision, FSDPPrecision))
        fsdp_norm = isinstance(precision, FSDPPrecision) and algorithm == GradClipAlgorithmType.NORM
        if not (gradient_clip_val and (fused_amp or fsdp_norm)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        # Under bf16 there is no scaler and the gradients are the true ones. Under fp16 they are unscaled
        # here, before clipping; GradScaler.step then tells the fused step that they already are (and still
        # skips steps whose gradients overflowed).
        if fused_amp and precision.scaler is not None:
            precision.scaler.unscale_(optimizer)
        if fsdp_norm:
            self.trainer.model.clip_grad_norm_(gradient_clip_val)  # the FSDP root: the norm over all shards
        else:
            Precision.clip_gradients(precision, optimizer, gradient_clip_val, algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_rng_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rng_states(checkpoint)
