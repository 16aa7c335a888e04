"""Callbacks the exact-resume tests of both LightningModules share."""

import lightning as L


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
