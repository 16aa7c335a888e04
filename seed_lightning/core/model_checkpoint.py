"""Lightning's ModelCheckpoint, with a `last.ckpt` of the final step of every fit."""

import lightning.pytorch as pl
from lightning.pytorch import callbacks


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments); with `save_last=True`, the end of fit also saves `last.ckpt`
    unless the final step already saved a checkpoint.

    Lightning alone keeps `last.ckpt` at the step of the latest periodic or validation save, so a run that
    ends between two saves (e.g. a 700-step smoke run with `every_n_train_steps: 500`) loses its last steps,
    and a resume with `ckpt_path: last` redoes them.
    """

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
