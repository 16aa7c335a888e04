"""Crash-safe checkpoint files, and the choice of which checkpoint a run resumes from.

`AtomicCheckpointIO` (a Trainer plugin) never leaves a half-written file under a checkpoint's final
name and keeps the previous `last.ckpt` as `last.prev.ckpt`, never letting a damaged file replace a
good one; `resolve_resume_path` turns `ckpt_path: last` into the newest checkpoint that passes
`checkpoint_problem`, falling back to older ones when the newest is damaged.

Which files are good is remembered in the process (see `AtomicCheckpointIO`), so that a multi-GB
checkpoint is read in full at most once: by the resume decision, or never when this process wrote it.
"""

import glob
import logging
import os
import pickle
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.io import atomic_open, temporary_path

log = logging.getLogger(__name__)

PREVIOUS_MARK = ".prev"
"""`last.ckpt` is kept as `last.prev.ckpt` (`last-v1.ckpt` as `last-v1.prev.ckpt`) when overwritten."""
DAMAGED_MARK = ".damaged-"
"""A damaged `last.ckpt` is kept aside as `last.damaged-<YYYYmmdd-HHMMSS>.ckpt`, which no resume picks."""

_LAST_NAME = re.compile(r"last(-v\d+)?(\.prev)?\.ckpt")
# Ckpt_path values that Lightning resolves itself.
_LIGHTNING_KEYWORDS = ("best", "hpc", "registry")
_READ_CHUNK = 1 << 24
_WEIGHTS_ONLY = "it holds weights only (saved with save_weights_only=True), so training cannot resume from it"

# What this process knows about checkpoint files: (device, inode, size, mtime in ns) -> checkpoint_problem()
# (None: good). Renames and hard links keep these four; rewriting or truncating a file changes them.
_verdicts: dict[tuple[int, int, int, int], str | None] = {}
_MAX_VERDICTS = 1024


def _is_remote(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _remember(path: Path, problem: str | None) -> None:
    identity = _identity(path)
    if identity is None:
        return
    _verdicts.pop(identity, None)
    _verdicts[identity] = problem
    if len(_verdicts) > _MAX_VERDICTS:
        del _verdicts[next(iter(_verdicts))]  # the oldest


def _remembered_problem(path: Path) -> str | None:
    """`checkpoint_problem(path)`, computed only if this process has no verdict on this version of the file."""
    identity = _identity(path)
    if identity in _verdicts:
        return _verdicts[identity]
    problem = checkpoint_problem(path)
    _remember(path, problem)
    return problem


def rename_aside(path: Path, mark: str, when: float | None = None) -> Path:
    """Rename `path` to `<stem><mark><YYYYmmdd-HHMMSS of when (default now)>[-n]<suffix>` in its folder, never
    over an existing file; returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    aside = path.with_name(f"{path.stem}{mark}{stamp}{path.suffix}")
    count = 1
    while aside.exists():
        aside = path.with_name(f"{path.stem}{mark}{stamp}-{count}{path.suffix}")
        count += 1
    os.rename(path, aside)
    return aside


def _set_aside(path: Path, problem: str) -> None:
    aside = rename_aside(path, DAMAGED_MARK)
    log.warning(f"Checkpoint {path} is damaged ({problem}): kept aside as {aside.name}, never resumed from.")


def previous_path(path: str | os.PathLike) -> Path:
    """Where the previous version of a `last*.ckpt` file is kept: `last.ckpt` -> `last.prev.ckpt`."""
    path = Path(path)
    return path.with_name(path.stem + PREVIOUS_MARK + path.suffix)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writer for local paths: a crash or full disk mid-save never damages an existing file.

    The checkpoint is streamed into a hidden temporary file in the target directory, flushed and
    fsynced, then renamed over the target (`os.replace`, atomic on POSIX), and the directory entry
    is fsynced. Before a `last*.ckpt` file is replaced, the old one is kept as `last*.prev.ckpt`
    (a hard link, so no copy is made), which `resolve_resume_path` falls back to. Unlike
    Lightning's default writer, the whole checkpoint is never held in memory as one bytes buffer.
    Temporary files left by a killed process are removed at the next save of the same file.
    Remote (fsspec URL) paths go to Lightning's default writer. Use it as
    `Trainer(plugins=[AtomicCheckpointIO()])`.

    A damaged `last.ckpt` never replaces `last.prev.ckpt`: it is renamed `last.damaged-<time>.ckpt`
    (one warning line) and `last.prev.ckpt` stays, so after any sequence of crashes a good checkpoint
    remains. Reading a multi-GB file in full at every save to tell is too slow, so the process
    remembers a verdict for each file version it has seen, by (device, inode, size, mtime), which
    renames and hard links keep and any rewrite changes: files it wrote itself (fsynced, then
    renamed) are good, and the files `resolve_resume_path` checked are as found. Only a `last.ckpt`
    with no verdict (e.g. a run resumed from an explicit path into a folder holding one) is read in
    full, once. A `last.prev.ckpt` known to be damaged is also set aside before it is replaced; one
    with no verdict is replaced unread, since it only ever receives a good file. Damage that
    changes neither size nor mtime (bit rot after the check) goes unseen until the next resume,
    which checks again. Weights-only checkpoints (`save_weights_only=True`) count as good here.

    Args:
        keep_previous_last: Keep the replaced `last*.ckpt` as `last*.prev.ckpt` (costs one
            checkpoint of disk space; it is what a damaged `last.ckpt` falls back to).
    """

    def __init__(self, keep_previous_last: bool = True) -> None:
        super().__init__()
        self.keep_previous_last = keep_previous_last

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or _is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        if target.parent.is_dir():
            for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
                stale.unlink(missing_ok=True)

        def before_replace(temporary: Path) -> None:
            # Complete and fsynced: its verdict holds under its final name too.
            _remember(temporary, None if "optimizer_states" in checkpoint else _WEIGHTS_ONLY)
            if self.keep_previous_last and _LAST_NAME.fullmatch(target.name) and PREVIOUS_MARK not in target.name:
                self._keep_previous(target)

        with atomic_open(target, "wb", before_replace) as file:
            torch.save(checkpoint, file)

    @staticmethod
    def _keep_previous(target: Path) -> None:
        # A symlink (ModelCheckpoint(save_last="link")) points at a top-k file that stays on disk.
        if not target.is_file() or target.is_symlink():
            return
        problem = _remembered_problem(target)
        if problem not in (None, _WEIGHTS_ONLY):
            _set_aside(target, problem)  # last.prev.ckpt, the good fallback, stays
            return
        keep = previous_path(target)
        problem = _verdicts.get(_identity(keep))  # known only: it is replaced by a good file either way
        if problem not in (None, _WEIGHTS_ONLY):
            _set_aside(keep, problem)
        staging = temporary_path(keep)
        try:
            os.link(target, staging)
        except OSError:  # filesystems without hard links
            shutil.copy2(target, staging)
        os.replace(staging, keep)


def checkpoint_problem(path: str | os.PathLike, training_state: bool = True) -> str | None:
    """Why training cannot resume from `path`, in a few words, or None when it looks good.

    Checks that the file is a complete torch zip archive whose every record matches its CRC-32
    (this reads the whole file once, catching truncation and bit rot), that its pickle loads with
    `torch.load(mmap=True, weights_only=True)` and that it holds a Lightning training state
    (model and optimiser; with `training_state=False` the model's weights are enough, as for
    evaluation). A checkpoint that is intact but needs `weights_only=False` to unpickle
    is accepted: trusting it is Lightning's decision at load time. Directories (sharded
    checkpoints) are accepted unchecked.
    """
    path = Path(path)
    if path.is_dir():
        return None
    if not path.is_file():
        return "it is a dangling symlink" if path.is_symlink() else "the file does not exist"
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0:  # torch skips CRCs when serialization.config.save.compute_crc32 is off
                    continue
                with archive.open(record) as member:
                    while member.read(_READ_CHUNK):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"it is truncated or corrupt ({exc})"
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc):
            return None
        return f"its pickle is unreadable ({exc})"
    except Exception as exc:  # torch raises many types for damaged archives
        return f"torch.load fails ({type(exc).__name__}: {exc})"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "it is not a Lightning checkpoint (no 'state_dict')"
    if "optimizer_states" not in checkpoint and training_state:
        return _WEIGHTS_ONLY
    return None


def load_checkpoint_data(path: str | os.PathLike, option: str) -> dict[str, Any]:
    """`torch.load(weights_only=True)` of a checkpoint: this project stores tensors and plain data only. A file
    that needs pickle's trust (an older version's or someone else's) is a ConfigError naming `option`, and
    nothing in it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc):
            raise
        raise ConfigError(
            f"{option}: {path} holds pickled objects besides tensors and plain data, which are not loaded unchecked;"
            f" if you trust it, keep its weights only: torch.save({{'state_dict': torch.load('{path}',"
            " weights_only=False)['state_dict']}, 'weights.ckpt') and point at that file"
        ) from None


def last_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The `last*.ckpt` files in `checkpoint_dir` (including `.prev` ones), newest first."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []

    def newest_first(path: Path) -> tuple[float, bool]:
        try:
            modified = path.stat().st_mtime
        except OSError:  # dangling symlink
            modified = path.lstat().st_mtime
        # On equal timestamps the current file wins over its kept predecessor.
        return (-modified, PREVIOUS_MARK in path.name)

    return sorted((p for p in directory.iterdir() if _LAST_NAME.fullmatch(p.name)), key=newest_first)


def checked_ckpt_path(ckpt_path: str, training_state: bool = True) -> str:
    """An explicit `ckpt_path` (not "last"), checked: Lightning's keywords ("best", "hpc", "registry...") and
    remote URLs unchanged, a file that passes `checkpoint_problem` as it is, else ConfigError naming the
    file and the problem. With `training_state=False` (validation) weights alone are enough. The verdict is
    remembered, so checking the same file again reads nothing."""
    if ckpt_path.startswith(_LIGHTNING_KEYWORDS) or _is_remote(ckpt_path):
        return ckpt_path
    problem = _remembered_problem(Path(ckpt_path))
    if problem is not None and (training_state or problem != _WEIGHTS_ONLY):
        action = "resume from" if training_state else "load"
        raise ConfigError(
            f"cannot {action} checkpoint {ckpt_path}: {problem}; pass another --ckpt_path"
            " (e.g. its .prev.ckpt twin or 'last')"
        )
    return str(ckpt_path)


def resolve_resume_path(ckpt_path: str | None, checkpoint_dir: str | os.PathLike) -> str | None:
    """The checkpoint file to pass to `Trainer.fit(ckpt_path=...)`, checked with `checkpoint_problem`.

    - None: None (no resume asked for).
    - "last": the newest good `last*.ckpt` in `checkpoint_dir`; each damaged newer one is skipped
      with one warning line naming it. No checkpoint there yet: None, with an info line (a fresh
      run). Only damaged `last*.ckpt` files, or other checkpoints but no `last*.ckpt`: ConfigError
      (starting over silently would lose the run).
    - any other value: `checked_ckpt_path`.
    Damaged files set aside by `AtomicCheckpointIO` (`*.damaged-*.ckpt`) are never candidates.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return checked_ckpt_path(ckpt_path)
    candidates = last_checkpoints(checkpoint_dir)
    if not candidates:
        others = sorted(
            (p for p in Path(checkpoint_dir).glob("*.ckpt") if DAMAGED_MARK not in p.name),
            key=lambda p: p.lstat().st_mtime,
            reverse=True,
        )
        if others:  # e.g. save_last off, or a crash between unlink and symlink with save_last="link"
            raise ConfigError(
                f"{checkpoint_dir} holds checkpoints but no last*.ckpt; pass --ckpt_path explicitly (newest:"
                f" {others[0].name}), or use an empty directory to start a fresh run"
            )
        log.info(f"No last checkpoint in {checkpoint_dir} yet: starting a fresh run.")
        return None
    for candidate in candidates:
        problem = _remembered_problem(candidate)
        if problem is None:
            log.info(f"Resuming from {candidate}.")
            return str(candidate)
        log.warning(f"Checkpoint {candidate} is unusable: {problem}; falling back to the previous one.")
    names = ", ".join(p.name for p in candidates)
    raise ConfigError(
        f"no usable last checkpoint in {checkpoint_dir} (all damaged: {names}); pass --ckpt_path to an older"
        " checkpoint, or move them away to start a fresh run"
    )


def checkpoint_dir(trainer: "pl.Trainer") -> Path:
    """Where this run writes checkpoints: the ModelCheckpoint's directory, else `<default_root_dir>/checkpoints`."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def save_last_checkpoint(trainer: "pl.Trainer") -> Path:
    """Save the full training state as `last.ckpt` in `checkpoint_dir(trainer)`, the file `ckpt_path: last` finds.

    Must be called on every rank (the save synchronises them). The ModelCheckpoint, if it keeps a
    last checkpoint, is told so that after a resume it keeps writing `last.ckpt` (not `last-v1.ckpt`).
    """
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        if callback.save_last:
            callback.last_model_path = str(path)
    else:
        path = checkpoint_dir(trainer) / "last.ckpt"
    trainer.save_checkpoint(path)
    return path
