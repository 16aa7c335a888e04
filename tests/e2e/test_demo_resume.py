"""`make demo-resume`: kill a tiny tokenizer run mid-epoch with SIGKILL, resume it, and show that its
losses equal those of an uninterrupted run, step for step (data order, RNG, optimiser state)."""

import os
import signal
from pathlib import Path

import pytest

from tests.cli_runs import CLI, run_in_own_group

HERE = Path(__file__).resolve().parent
STEPS, KILL_AT = 10, 7  # 6 batches an epoch: the kill lands mid-epoch 2


def overlay(run_dir: Path, kill_at: int | None) -> str:
    callbacks = ""
    if kill_at is not None:
        callbacks += f"""
    - class_path: sigkill_callback.SigkillAt
      init_args: {{step: {kill_at}}}"""
    return f"""
trainer:
  max_steps: {STEPS}
  max_epochs: -1
  log_every_n_steps: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  deterministic: true
  default_root_dir: {run_dir}
  enable_progress_bar: false
  callbacks:{callbacks}
checkpoint: {{monitor: null, every_n_train_steps: 1}}
data:
  batch_size: 16
  samples_per_epoch: 96
  num_workers: 2
"""


def fit(repo: Path, run_dir: Path, kill_at: int | None = None) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "overlay.yaml").write_text(overlay(run_dir, kill_at))
    command = [*CLI, "tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", "-c", str(run_dir / "overlay.yaml"),
               "--ckpt_path", "last"]
    log = run_dir / "log.txt"
    # Own process group: after the SIGKILL, its orphaned DataLoader workers are killed with the group.
    returncode = run_in_own_group(command, log, timeout=600, env={"PYTHONPATH": f"{HERE}{os.pathsep}{repo}"})
    if returncode not in (0, -signal.SIGKILL):
        raise AssertionError(log.read_text()[-3000:])
    return returncode


def logged_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=os.path.getmtime):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            losses.update({e.step: e.value for e in accumulator.Scalars("train/loss")})
    return losses


@pytest.mark.slow
def test_sigkilled_run_resumes_with_identical_losses(default_world, tmp_path):
    repo = default_world.repo
    straight_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    assert fit(repo, straight_dir) == 0
    assert fit(repo, killed_dir, kill_at=KILL_AT) == -9  # really killed by SIGKILL
    before_resume = logged_losses(killed_dir)
    assert max(before_resume) < KILL_AT
    assert fit(repo, killed_dir) == 0  # the same command again resumes from last.ckpt

    straight, resumed = logged_losses(straight_dir), logged_losses(killed_dir)
    print(f"\n{'step':>4} {'uninterrupted':>14} {'killed at ' + str(KILL_AT) + ' + resumed':>22}")
    for step in sorted(straight):
        print(f"{step:>4} {straight[step]:>14.6f} {resumed.get(step, float('nan')):>22.6f}")
    assert sorted(straight) == sorted(resumed) == list(range(STEPS))
    assert [resumed[s] for s in range(STEPS)] == pytest.approx([straight[s] for s in range(STEPS)], rel=1e-5)
