"""Save `last.ckpt` and stop cleanly when the job is told to stop (SIGTERM, SIGINT, SLURM's SIGUSR1).

The signal handler only records the signal; the checkpoint is written at the end of the current
training batch through `trainer.save_checkpoint`, so the loops, optimiser, schedulers, callbacks and
datamodule state are all in it, and the same command with `ckpt_path: last` resumes the run.

Interaction with Lightning: while training runs (`on_train_start` to `on_train_end`) this callback
owns the three signals and does not chain to earlier handlers, so Lightning's own reactions are
bypassed: its SIGTERM handling (stop without a checkpoint, exit status 0) and
`SLURMEnvironment(auto_requeue=True)`'s SIGUSR1 handler (a checkpoint written from inside the
signal handler, mid-step, then `scontrol requeue`). Requeueing is the job script's business (see
the README); `plugins: [{class_path: lightning.pytorch.plugins.environments.SLURMEnvironment,
init_args: {auto_requeue: false}}]` states that explicitly. The previous handlers come back at the
end of training or on an exception.
"""

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from seed_lightning.core.checkpointing import save_last_checkpoint
from seed_lightning.core.errors import ConfigError

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Process exit status after a signal-triggered save (sysexits EX_TEMPFAIL: "try again later")."""


class RunPreempted(SystemExit):
    """Raised after `last.ckpt` was saved on a stop signal; the process exits with `PREEMPTED_EXIT_CODE`.

    A SystemExit (like Lightning's own SIGTERMException) so that the process ends with that status
    and no traceback; Lightning still runs `on_exception` hooks and finalises the loggers first.
    """

    def __init__(self, message: str, checkpoint_path: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message
        self.checkpoint_path = checkpoint_path


class PreemptionCheckpoint(Callback):
    """On a stop signal: save `last.ckpt` at the end of the current batch, then end the process with status 75.

    The signal is acted on at the first training-batch end after it arrives (a validation pass
    running at that moment finishes first), on all ranks together: the ranks agree through one
    boolean all-reduce per batch, so a signal that reached only rank 0 still stops every rank at
    the same step. A second SIGINT (Ctrl+C) while the save is pending interrupts at once.

    Args:
        signals: Names of the signals that trigger a save and stop; SLURM sends SIGUSR1 before the
            time limit when the job asks for it (`#SBATCH --signal=USR1@90`).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGINT", "SIGUSR1")) -> None:
        self.signals = []
        for name in signals:
            number = getattr(signal.Signals, name.upper(), None)
            if number is None:
                raise ConfigError(f"PreemptionCheckpoint: unknown signal {name!r}; use names like SIGTERM or SIGUSR1")
            self.signals.append(number)
        self.received: signal.Signals | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two Python bytecodes of the main thread: record only, act at the batch end.
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: not in the main thread, so no signal handlers were installed.")
            return
        for number in self.signals:
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def _restore_handlers(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = str(save_last_checkpoint(trainer))
        name = self.received.name if self.received is not None else "a stop signal on another rank"
        message = (
            f"Received {name}: saved {path} at step {trainer.global_step} and stopped (exit status"
            f" {PREEMPTED_EXIT_CODE}); run the same command with ckpt_path=last to resume."
        )
        if trainer.is_global_zero:
            log.warning(message)
        self._restore_handlers()
        raise RunPreempted(message, path)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore_handlers()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._restore_handlers()
