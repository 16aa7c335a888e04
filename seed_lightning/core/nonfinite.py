"""Skip optimiser steps whose loss or gradients are NaN/Inf, and stop a run that keeps diverging.

How a step is skipped: Lightning calls `on_before_optimizer_step` after backward (and after the
fp16 GradScaler's unscale) but before the optimiser's update, which runs inside
`optimizer.step(closure)`. `NonFiniteGuard` checks the loss (seen in `on_before_backward`) and the
gradients there and, when any is non-finite, sets every gradient of that optimiser to None. All
torch optimisers leave parameters without a gradient untouched: no update, no weight decay, and no
change to their state (Adam moments and step counts). This needs no change to the LightningModule
or the optimiser, works with gradient accumulation, clipping and DDP/FSDP (the decision is agreed
across ranks), and costs one device-to-host sync per optimiser step.

Deliberate consequences:
- `trainer.global_step` and a step-interval LR scheduler still advance on a skipped step (as they
  do for steps the fp16 GradScaler skips), so the LR stays a function of `global_step` and the
  data position; holding the scheduler back would need a per-module `lr_scheduler_step` override
  or a patched scheduler that leaks into its `state_dict`.
- With `precision: 16-mixed` the GradScaler already skips steps whose gradients overflow and
  lowers its scale; those are routine while the scale calibrates, so only a non-finite loss counts
  here (no double counting). Without a GradScaler (32-true, bf16-mixed, bf16-true), non-finite
  gradients count too.
- Automatic optimisation with one optimiser is the supported case; DeepSpeed (which steps its own
  way) is not.
"""

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.utils import get_total_norm

from seed_lightning.core.checkpointing import checkpoint_dir
from seed_lightning.core.errors import ConfigError, SeedLightningError

log = logging.getLogger(__name__)

NONFINITE_EXIT_CODE = 65
"""Process exit status for a diverged run (sysexits EX_DATAERR); see `NonFiniteTrainingError.exit_code`."""

SKIPPED_STEPS_METRIC = "train/skipped_nonfinite_steps"


class NonFiniteTrainingError(SeedLightningError):
    """The loss or gradients stayed non-finite for too many steps in a row; the run was stopped.

    `checkpoint_path` holds the weights from before the blow-up. An entry point should print the
    one-line message and exit with `exit_code`, which scripts can test for.
    """

    exit_code = NONFINITE_EXIT_CODE

    def __init__(self, message: str, checkpoint_path: str) -> None:
        super().__init__(message)
        self.checkpoint_path = checkpoint_path


def _all_finite(gradients: list[torch.Tensor]) -> torch.Tensor:
    # The max-abs norm propagates NaN and Inf without overflowing on large finite values.
    local = [g.to_local() if hasattr(g, "to_local") else g for g in gradients]  # DTensor shards (FSDP2)
    return torch.isfinite(get_total_norm(local, norm_type=math.inf))


class NonFiniteGuard(Callback):
    """Skips optimiser steps with a NaN/Inf loss or gradient; stops the run after `max_consecutive` in a row.

    Logs the running total of skipped steps as `train/skipped_nonfinite_steps`. After
    `max_consecutive` consecutive skipped steps it saves `nonfinite-step<N>.ckpt` in the run's
    checkpoint directory (its weights are the last finite ones, since the bad steps were skipped)
    and raises `NonFiniteTrainingError` naming the steps and that file. The counts are part of the
    checkpointed callback state, so they survive a resume.

    Args:
        max_consecutive: Consecutive skipped optimiser steps that end the run (at least 1).
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ConfigError(f"NonFiniteGuard.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self._loss_finite: torch.Tensor | None = None

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        # Accumulated over the micro-batches of one optimiser step; kept on the device (no sync here).
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        finite = self._loss_finite if self._loss_finite is not None else torch.tensor(True)
        self._loss_finite = None
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            gradients = [p.grad for p in parameters if p.grad is not None]
            if gradients:
                finite = finite.to(gradients[0].device) & _all_finite(gradients)
        if trainer.strategy.reduce_boolean_decision(bool(finite), all=True):
            self.consecutive = 0
            self.first_bad_step = None
            return
        for parameter in parameters:
            parameter.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = trainer.global_step
        if trainer.is_global_zero:
            log.warning(
                f"Non-finite loss or gradients at step {trainer.global_step}: optimizer step skipped"
                f" ({self.consecutive} in a row, {self.skipped_steps} in total)."
            )

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log(SKIPPED_STEPS_METRIC, float(self.skipped_steps), on_step=True, on_epoch=False)
        if self.consecutive < self.max_consecutive:
            return
        last_bad_step = trainer.global_step - 1
        path = str(checkpoint_dir(trainer) / f"nonfinite-step{last_bad_step}.ckpt")
        trainer.save_checkpoint(path)
        raise NonFiniteTrainingError(
            f"training diverged: the loss or gradients were NaN/Inf for {self.consecutive} optimizer steps in a row"
            f" (steps {self.first_bad_step}-{last_bad_step}, all skipped); the weights from before step"
            f" {self.first_bad_step} are saved in {path}: lower the learning rate or inspect the data of those"
            f" steps, then resume with --ckpt_path {path}",
            path,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive": self.consecutive,
            "first_bad_step": self.first_bad_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict["skipped_steps"]
        self.consecutive = state_dict["consecutive"]
        self.first_bad_step = state_dict["first_bad_step"]
