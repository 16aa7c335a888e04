import errno
import io
import logging
import os
from pathlib import Path

import pytest
from tests.faults.regression import Regression
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from seed_lightning.core import checkpointing
from seed_lightning.core.checkpointing import AtomicCheckpointIO, checkpoint_problem, resolve_resume_path
from seed_lightning.core.errors import ConfigError


def training_state(step: int, size: int = 16) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((size,), float(step))}, "optimizer_states": [{}]}


def fit(tmp_path, max_steps, ckpt_path=None, save_last=True, io=None, **checkpoint_kwargs):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=save_last, every_n_train_steps=1, **checkpoint_kwargs
    )
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[io or AtomicCheckpointIO()],
        callbacks=[checkpoint],
    )
    trainer.fit(Regression(), ckpt_path=ckpt_path)
    return trainer


def load_step(path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


@pytest.fixture
def io_plugin():
    return AtomicCheckpointIO()


def test_crash_mid_write_leaves_the_previous_last_checkpoint_intact(tmp_path, io_plugin, monkeypatch):
    last = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint(training_state(1), last)
    real_save = torch.save

    def disk_full_halfway(obj, file):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_halfway)
    with pytest.raises(OSError, match="No space"):
        io_plugin.save_checkpoint(training_state(2), last)
    monkeypatch.undo()

    assert load_step(last) == 1
    assert checkpoint_problem(last) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file, no .prev


def test_overwriting_last_keeps_the_previous_one_and_only_for_last(tmp_path, io_plugin):
    for step in (1, 2):
        io_plugin.save_checkpoint(training_state(step), tmp_path / "last.ckpt")
        io_plugin.save_checkpoint(training_state(step), tmp_path / "best.ckpt")
    assert load_step(tmp_path / "last.ckpt") == 2
    assert load_step(tmp_path / "last.prev.ckpt") == 1
    assert not (tmp_path / "best.prev.ckpt").exists()
    AtomicCheckpointIO(keep_previous_last=False).save_checkpoint(training_state(3), tmp_path / "last.ckpt")
    assert load_step(tmp_path / "last.prev.ckpt") == 1


def test_temp_file_left_by_a_killed_save_is_cleaned_up(tmp_path, io_plugin):
    stale = tmp_path / ".last.ckpt.4242-deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    io_plugin.save_checkpoint(training_state(1), tmp_path / "last.ckpt")
    assert not stale.exists()


def test_truncation_and_bit_rot_are_detected(tmp_path, io_plugin):
    path = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint(training_state(1, size=1 << 16), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in checkpoint_problem(path)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the 256 KiB tensor record
    path.write_bytes(bytes(flipped))
    assert "CRC" in checkpoint_problem(path)

    path.write_bytes(data)
    assert checkpoint_problem(path) is None


def test_weights_only_checkpoint_cannot_be_resumed(tmp_path, io_plugin):
    path = tmp_path / "weights.ckpt"
    io_plugin.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    assert "weights only" in checkpoint_problem(path)


def test_resume_last_falls_back_past_a_corrupt_last_and_training_continues(tmp_path, caplog):
    fit(tmp_path, max_steps=3)
    ckpt_dir = tmp_path / "ckpt"
    assert resolve_resume_path("last", ckpt_dir) == str(ckpt_dir / "last.ckpt")
    assert load_step(ckpt_dir / "last.ckpt") == 3
    assert load_step(ckpt_dir / "last.prev.ckpt") == 2

    last = ckpt_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="seed_lightning"):
        resumed_from = resolve_resume_path("last", ckpt_dir)
    assert resumed_from == str(ckpt_dir / "last.prev.ckpt")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(last) in warnings[0]

    trainer = fit(tmp_path, max_steps=5, ckpt_path=resumed_from)
    assert trainer.global_step == 5
    assert load_step(last) == 5 and checkpoint_problem(last) is None


def test_explicit_corrupt_or_missing_path_is_a_config_error_naming_the_file(tmp_path):
    corrupt = tmp_path / "epoch=1.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConfigError, match="epoch=1.ckpt: it is truncated or corrupt") as error:
        resolve_resume_path(str(corrupt), tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_resume_path(str(tmp_path / "missing.ckpt"), tmp_path)


def test_no_checkpoint_yet_starts_fresh_but_unusable_ones_refuse(tmp_path, caplog):
    assert resolve_resume_path(None, tmp_path) is None
    assert resolve_resume_path("best", tmp_path) == "best"  # Lightning resolves its own keywords
    with caplog.at_level(logging.INFO, logger="seed_lightning"):
        assert resolve_resume_path("last", tmp_path / "not-yet-created") is None
    assert "starting a fresh run" in caplog.text

    (tmp_path / "epoch=0-step=9.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match="no last.*ckpt; pass --ckpt_path explicitly.*epoch=0-step=9.ckpt"):
        resolve_resume_path("last", tmp_path)
    (tmp_path / "last.ckpt").write_bytes(b"garbage")
    (tmp_path / "last.prev.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match="no usable last checkpoint.*last.ckpt, last.prev.ckpt"):
        resolve_resume_path("last", tmp_path)


def test_symlinked_last_from_save_last_link(tmp_path):
    fit(tmp_path, max_steps=2, save_last="link", save_top_k=1)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_symlink()
    assert resolve_resume_path("last", last.parent) == str(last)
    last.resolve().unlink()
    assert checkpoint_problem(last) == "it is a dangling symlink"
    with pytest.raises(ConfigError, match="no usable last checkpoint"):
        resolve_resume_path("last", last.parent)


def test_newest_good_last_wins_over_older_versions(tmp_path, io_plugin):
    io_plugin.save_checkpoint(training_state(1), tmp_path / "last.ckpt")
    io_plugin.save_checkpoint(training_state(2), tmp_path / "last-v1.ckpt")
    os.utime(tmp_path / "last.ckpt", (1, 1))
    assert resolve_resume_path("last", tmp_path) == str(tmp_path / "last-v1.ckpt")


def new_process() -> None:
    """A resume is a new process: it knows nothing yet about which files are good."""
    checkpointing._verdicts.clear()


def truncate(path) -> bytes:
    damaged = path.read_bytes()[:1000]
    path.write_bytes(damaged)
    return damaged


class GoodStaysGoodIO(AtomicCheckpointIO):
    """Checks around every save that each file name that held a good checkpoint still holds a good one,
    and that a good last checkpoint is left to resume from."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        directory = Path(path).parent
        good_before = [p.name for p in directory.glob("*.ckpt") if checkpoint_problem(p) is None]
        super().save_checkpoint(checkpoint, path, storage_options)
        for name in good_before:
            assert checkpoint_problem(directory / name) is None, f"{name} was good and was replaced by a damaged file"
        lasts = checkpointing.last_checkpoints(directory)
        assert any(checkpoint_problem(p) is None for p in lasts), f"no good last checkpoint left: {lasts}"


def damaged_aside(ckpt_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted(ckpt_dir.glob("last.damaged-*.ckpt"))]


def test_truncated_last_resume_save_twice_truncate_again_resume(tmp_path, caplog):
    """The fault-injection test: every resume starts from a good checkpoint, and no good checkpoint is ever
    overwritten by a damaged one; the damaged files are kept aside, each with one warning line."""
    ckpt_dir = tmp_path / "ckpt"
    last, previous = ckpt_dir / "last.ckpt", ckpt_dir / "last.prev.ckpt"
    fit(tmp_path, max_steps=3)
    first_damage = truncate(last)

    new_process()
    resumed_from = resolve_resume_path("last", ckpt_dir)
    assert resumed_from == str(previous) and load_step(resumed_from) == 2
    with caplog.at_level(logging.WARNING, logger="seed_lightning"):
        fit(tmp_path, max_steps=4, ckpt_path=resumed_from, io=GoodStaysGoodIO())  # saves at steps 3 and 4
    assert (load_step(last), load_step(previous)) == (4, 3)
    assert damaged_aside(ckpt_dir) == [first_damage]
    kept_aside = [r.getMessage() for r in caplog.records if "kept aside" in r.getMessage()]
    assert len(kept_aside) == 1 and str(last) in kept_aside[0]

    second_damage = truncate(last)
    new_process()
    resumed_from = resolve_resume_path("last", ckpt_dir)
    assert resumed_from == str(previous) and load_step(resumed_from) == 3
    fit(tmp_path, max_steps=6, ckpt_path=resumed_from, io=GoodStaysGoodIO())
    assert (load_step(last), load_step(previous)) == (6, 5)
    assert sorted(damaged_aside(ckpt_dir)) == sorted([first_damage, second_damage])
    new_process()
    assert resolve_resume_path("last", ckpt_dir) == str(last)  # the damaged files are never candidates


def test_saves_read_no_checkpoint_the_resume_decision_or_the_process_has_judged(tmp_path, monkeypatch):
    fit(tmp_path, max_steps=3)
    ckpt_dir = tmp_path / "ckpt"
    truncate(ckpt_dir / "last.ckpt")
    new_process()
    checked = []
    real_check = checkpoint_problem

    def counting_check(path, *args, **kwargs):
        checked.append(Path(path).name)
        return real_check(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint_problem", counting_check)
    resumed_from = resolve_resume_path("last", ckpt_dir)
    assert checked == ["last.ckpt", "last.prev.ckpt"]
    fit(tmp_path, max_steps=6, ckpt_path=resumed_from)  # three saves of last.ckpt
    assert checked == ["last.ckpt", "last.prev.ckpt"]
    assert load_step(ckpt_dir / "last.ckpt") == 6 and len(damaged_aside(ckpt_dir)) == 1


def test_unjudged_damaged_last_is_checked_once_and_set_aside(tmp_path):
    """Resuming from an explicit file: the damaged last.ckpt in the folder was never judged by this process."""
    fit(tmp_path, max_steps=3)
    ckpt_dir = tmp_path / "ckpt"
    good = tmp_path / "step2.ckpt"
    os.replace(ckpt_dir / "last.prev.ckpt", good)
    damage = truncate(ckpt_dir / "last.ckpt")
    new_process()
    fit(tmp_path, max_steps=4, ckpt_path=resolve_resume_path(str(good), ckpt_dir))
    assert damaged_aside(ckpt_dir) == [damage]
    assert load_step(ckpt_dir / "last.ckpt") == 4 and load_step(ckpt_dir / "last.prev.ckpt") == 3


def test_weights_only_last_is_not_set_aside_as_damaged(tmp_path, io_plugin):
    weights = {"state_dict": {"w": torch.ones(2)}}
    io_plugin.save_checkpoint(weights, tmp_path / "last.ckpt")
    new_process()
    io_plugin.save_checkpoint(weights, tmp_path / "last.ckpt")
    io_plugin.save_checkpoint(weights, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
