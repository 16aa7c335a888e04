"""PreemptionCheckpoint: a stop signal saves last.ckpt at the batch end, exits with status 75, and the run resumes.

Run as a script (`python test_preemption.py CKPT_DIR SIGNAL_STEP MAX_STEPS`), this file is the
training process that the slow test signals.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.faults.regression import Regression
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from seed_lightning.core.checkpointing import AtomicCheckpointIO, checkpoint_problem, resolve_resume_path
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint, RunPreempted

REPO_ROOT = Path(__file__).resolve().parents[2]


class SignalAtStep(Callback):
    """Sends `signum` to this process at the end of optimiser step `step` (1-based, as global_step counts)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class FirstStep(Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


def make_trainer(ckpt_dir, max_steps, *callbacks):
    torch.manual_seed(0)
    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=Path(ckpt_dir).parent,
        plugins=[AtomicCheckpointIO()],
        callbacks=[*callbacks, PreemptionCheckpoint(), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )


def resume_to_the_end(ckpt_dir, max_steps):
    first = FirstStep()
    trainer = make_trainer(ckpt_dir, max_steps, first)
    trainer.fit(Regression(), ckpt_path=resolve_resume_path("last", ckpt_dir))
    return first.step, trainer.global_step


def step_in(path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


@pytest.mark.slow
def test_sigterm_to_a_training_process_saves_last_and_exits_75_then_resume_finishes(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.run(
        [sys.executable, __file__, str(ckpt_dir), "3", "8"], env=env, capture_output=True, text=True, timeout=120
    )
    assert process.returncode == PREEMPTED_EXIT_CODE, process.stderr[-2000:]
    assert "Received SIGTERM" in process.stderr and "Traceback" not in process.stderr
    last = ckpt_dir / "last.ckpt"
    assert checkpoint_problem(last) is None and step_in(last) == 3

    assert resume_to_the_end(ckpt_dir, 8) == (3, 8)
    assert step_in(last) == 8
    assert not list(ckpt_dir.glob("last-v*.ckpt"))


@pytest.fixture
def usr1_sentinel():
    """A SIGUSR1 handler that records calls, so a missing handler cannot kill the test process."""
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    yield signal.getsignal(signal.SIGUSR1), calls
    signal.signal(signal.SIGUSR1, previous)


def test_sigusr1_in_process_saves_restores_handlers_and_resumes(tmp_path, usr1_sentinel):
    sentinel, sentinel_calls = usr1_sentinel
    ckpt_dir = tmp_path / "ckpt"
    trainer = make_trainer(ckpt_dir, 6, SignalAtStep(2, signal.SIGUSR1))
    with pytest.raises(RunPreempted) as stop:
        trainer.fit(Regression())
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert "SIGUSR1" in stop.value.message and stop.value.checkpoint_path == str(ckpt_dir / "last.ckpt")
    assert step_in(ckpt_dir / "last.ckpt") == 2
    assert signal.getsignal(signal.SIGUSR1) is sentinel and not sentinel_calls

    assert resume_to_the_end(ckpt_dir, 6) == (2, 6)
    assert signal.getsignal(signal.SIGUSR1) is sentinel


def test_a_run_without_signals_is_unaffected(tmp_path):
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    trainer = make_trainer(tmp_path / "ckpt", 3)
    trainer.fit(Regression())
    assert trainer.global_step == 3
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before


def test_second_ctrl_c_interrupts_at_once():
    callback = PreemptionCheckpoint()
    callback._on_signal(signal.SIGINT, None)
    assert callback.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        callback._on_signal(signal.SIGINT, None)


def test_unknown_signal_name_is_a_config_error():
    with pytest.raises(ConfigError, match="SIGTREM"):
        PreemptionCheckpoint(signals=["SIGTREM"])


if __name__ == "__main__":
    directory, signal_step, total_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    make_trainer(directory, total_steps, SignalAtStep(signal_step, signal.SIGTERM)).fit(Regression())
