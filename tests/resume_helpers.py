"""What the exact-resume tests of both LightningModules share."""

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses, self.keys = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.keys.append(list(batch["key"]))


class Crash(L.Callback):
    """Dies at the start of step `at`, after the checkpoint of the step before: a kill mid-epoch."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def fit_recording(trainer: L.Trainer, fit: Callable[[L.Trainer], None]) -> LossRecorder:
    """Runs `fit(trainer)` (a trainer built with `resume_callbacks`), tolerating the simulated crash."""
    try:
        fit(trainer)
    except RuntimeError as error:
        assert "simulated crash" in str(error)
    return next(c for c in trainer.callbacks if isinstance(c, LossRecorder))


def resume_callbacks(root: Path, crash_at: int | None) -> list[L.Callback]:
    callbacks = [LossRecorder(), ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1)]
    return callbacks + ([Crash(crash_at)] if crash_at is not None else [])


def assert_resume_reproduces(run: Callable[..., LossRecorder], root: Path, steps: int = 5, crash_at: int = 2) -> None:
    """`run(root, crash_at=None, ckpt_path=None)` trains `steps` steps; crashing at `crash_at` and resuming
    from last.ckpt must see the same batches and losses as the uninterrupted run."""
    straight = run(root / "a")
    first = run(root / "b", crash_at=crash_at)
    second = run(root / "b", ckpt_path=str(root / "b" / "ckpt" / "last.ckpt"))
    assert len(straight.losses) == steps and len(first.losses) == crash_at
    assert first.keys + second.keys == straight.keys
    assert first.losses + second.losses == pytest.approx(straight.losses, rel=1e-5)
