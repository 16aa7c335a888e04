"""The pattern every evaluation callback follows, so that DDP gives the same numbers as one process:
each rank keeps ``{val index: prediction}``; at epoch end the dicts of all ranks are gathered and
merged by index (sampler padding never counts twice), rank 0 scores and writes result files, and the
metrics are broadcast so that every rank logs the same values.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from seed_lightning.core.distributed import gather_objects, merge_by_index
from seed_lightning.core.errors import ConfigError

T = TypeVar("T")


def results_dir(trainer: L.Trainer) -> Path:
    """Where result files go: the logger's run folder, else the trainer's default_root_dir.

    A collective (``trainer.log_dir`` broadcasts rank 0's folder): call it on every rank, never inside a
    rank-0 branch, or the next broadcast of the other ranks receives this path instead of their own object.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def evaluates_now(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """True for trainer.validate, and in fit for every `every_n_epochs`-th epoch (never in the sanity check)."""
    if trainer.sanity_checking:
        return False
    return trainer.state.fn == TrainerFn.VALIDATING or (trainer.current_epoch + 1) % every_n_epochs == 0


def merge_ranks(outputs: Mapping[int, T]) -> dict[int, T]:
    """Every rank's ``{val index: output}`` merged into one dict (a collective: call on all ranks)."""
    return merge_by_index(gather_objects(dict(outputs)))


def publish(
    trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict[str, float] | None, prog_bar: tuple[str, ...] = ()
) -> dict[str, float]:
    """Broadcast rank 0's `metrics` and log them on every rank (TensorBoard + progress bar for `prog_bar`)."""
    metrics = trainer.strategy.broadcast(metrics, src=0) or {}
    for name, value in metrics.items():
        pl_module.log(name, float(value), prog_bar=name in prog_bar, rank_zero_only=False)
    return metrics


def add_to_tensorboard(trainer: L.Trainer, kind: str, tag: str, value: Any) -> None:
    """`experiment.add_text` / `add_image` on every logger that has it (rank 0 only: loggers write there)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        writer = getattr(getattr(logger, "experiment", None), f"add_{kind}", None)
        if writer is not None:
            writer(tag, value, global_step=trainer.global_step)


def require_attribute(pl_module: L.LightningModule, name: str, callback: str) -> Any:
    module = getattr(pl_module, name, None)
    if module is None:
        raise ConfigError(f"{callback} needs a LightningModule with a `.{name}` attribute; "
                          f"{type(pl_module).__name__} has none: remove the callback from this config")
    return module


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


class IndexedValidationCallback(L.Callback):
    """Base of the evaluation callbacks, following the pattern above: during validation each rank
    collects ``{val index: output}`` (`collect`); at epoch end the outputs of every rank, merged by
    index, go to `finish` on every rank (which scores on rank 0 and calls `publish`), with the folder for
    result files (looked up here, on every rank: the lookup is a collective).
    `active` says whether this validation epoch is evaluated."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        super().__init__()
        check_positive(every_n_epochs=every_n_epochs)
        self.every_n_epochs = every_n_epochs
        self._outputs: dict[int, Any] = {}

    def active(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        return evaluates_now(trainer, self.every_n_epochs)

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> dict[int, Any]:
        """This rank's outputs for one val batch, by val index."""
        raise NotImplementedError

    def finish(
        self, trainer: L.Trainer, pl_module: L.LightningModule, merged: dict[int, Any], directory: Path
    ) -> None:
        """Score the outputs of every rank, writing result files into `directory` (called on every rank: it must
        reach `publish`, and no collective may hide in its rank-0 branch)."""
        raise NotImplementedError

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outputs = {}

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.active(trainer, pl_module):
            self._outputs.update(self.collect(trainer, pl_module, batch))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active(trainer, pl_module):
            return
        merged = merge_ranks(self._outputs)
        self._outputs = {}
        self.finish(trainer, pl_module, merged, results_dir(trainer))
