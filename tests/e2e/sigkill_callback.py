"""A callback for the kill/resume demonstration: the process SIGKILLs itself at a given step."""

import os
import signal

import lightning as L


class SigkillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no final checkpoint: a real crash
