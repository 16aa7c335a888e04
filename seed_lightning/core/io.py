"""The package's one atomic file writer: readers see the old file or the complete new one, never a partial one.

Everything the package writes for others to read (checkpoints, metric and prediction JSON, token-shard manifests
and the tokenizer record, embedding-cache chunks) goes through `atomic_open` or `write_json_atomic`.
"""

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_path(path: Path) -> Path:
    """A hidden, process-unique temporary name beside `path` (same directory: the rename stays on one filesystem)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable; some platforms/filesystems cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "wb", before_replace: Callable[[Path], None] | None = None
) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing (`mode` "wb" or "w"); when the block ends normally it is
    flushed, fsynced and renamed over `path` (`os.replace`, atomic on POSIX) and the directory entry is fsynced.
    When the block raises, the temporary file is removed and `path` is untouched. `before_replace(temporary)` runs
    on the complete, fsynced temporary file just before the rename."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        with open(temporary, mode.replace("w", "x"), **({"encoding": "utf-8"} if mode == "w" else {})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        if before_replace is not None:
            before_replace(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int | None = None) -> Path:
    """Write `payload` as JSON (UTF-8, a final newline) with `atomic_open`."""
    with atomic_open(path, "w") as file:
        file.write(json.dumps(payload, indent=indent) + "\n")
    return Path(path)
