"""A disk cache of per-sample tensors keyed by sample key.

Stage 2 of the tokenizer trains on the causal embeddings of a FROZEN ViT + Q-Former: they are the
same every epoch, so each is computed once, written here, and read back instead of re-running the
encoders. Chunks are fp16 `.npy` files, memory-mapped when read (a batch is one fancy-indexed read
per chunk, and the cache can be far larger than RAM), each with a `.keys.json` naming its rows.
Both are written atomically (`core/io.py`; the keys first, so an `.npy` under its final
name always has its keys). Each rank writes its own chunks and reads everybody's after `refresh()`. A key that
several ranks cached (each its own random crop) is read from the chunk whose name sorts first, so any processes
that indexed the same chunks read the same rows, whatever order they found them in.

Read in DataLoader workers too (`tokenizer/frozen_outputs.py`): a forked worker shares its owner's cache as it was
at the fork; a pickled one (another start method) opens the directory anew, without the owner's unflushed rows.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import get_worker_info

from seed_lightning.core.io import atomic_open, write_json_atomic


class EmbeddingCache:
    def __init__(self, directory: str | os.PathLike, rank: int = 0, rows_per_chunk: int = 4096):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.rows_per_chunk = rows_per_chunk
        # Flushed rows stay on disk (memory-mapped chunks); only unflushed ones are in memory.
        self._pending: dict[str, torch.Tensor] = {}
        self._index: dict[str, tuple[int, int]] = {}
        self._chunks: list[np.ndarray] = []
        self._chunk_paths: list[Path] = []
        self.refresh()

    def __getstate__(self) -> dict:
        # The directory, not the rows: a pickled cache (a DataLoader worker's) maps the chunks itself.
        return {"directory": self.directory, "rank": self.rank, "rows_per_chunk": self.rows_per_chunk}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def refresh(self) -> None:
        """Index every complete chunk in the directory (those of other ranks too)."""
        for path in sorted(set(self.directory.glob("chunk-*.npy")) - set(self._chunk_paths)):
            keys = json.loads(path.with_suffix(".keys.json").read_text())
            chunk = len(self._chunks)
            self._chunks.append(np.load(path, mmap_mode="r"))
            self._chunk_paths.append(path)
            for row, key in enumerate(keys):
                indexed = self._index.get(key)
                if indexed is None or path < self._chunk_paths[indexed[0]]:
                    self._index[key] = (chunk, row)

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def __contains__(self, key: str) -> bool:
        return key in self._index or key in self._pending

    def get(self, keys: list[str]) -> torch.Tensor | None:
        """The stacked rows of `keys` (fp16), or None when any is missing (the caller then computes them)."""
        if not all(k in self for k in keys):
            return None
        by_chunk: dict[int, tuple[list[int], list[int]]] = {}
        pending = []
        for position, key in enumerate(keys):
            if key in self._pending:
                pending.append((position, key))
            else:
                chunk, row = self._index[key]
                positions, rows = by_chunk.setdefault(chunk, ([], []))
                positions.append(position)
                rows.append(row)
        shape = self._pending[pending[0][1]].shape if pending else self._chunks[next(iter(by_chunk))].shape[1:]
        out = _batch_buffer((len(keys), *shape))
        for chunk, (positions, rows) in by_chunk.items():
            out[positions] = torch.from_numpy(np.ascontiguousarray(self._chunks[chunk][rows]))
        for position, key in pending:
            out[position] = self._pending[key]
        return out

    def put(self, keys: list[str], rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float16)
        for key, row in zip(keys, rows):
            if key not in self:
                self._pending[key] = row.clone()
        if len(self._pending) >= self.rows_per_chunk:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        index = len(list(self.directory.glob(f"chunk-r{self.rank}-*.npy")))
        path = self.directory / f"chunk-r{self.rank}-{index:06d}.npy"
        keys = list(self._pending)
        rows = torch.stack([self._pending[k] for k in keys]).numpy()
        write_json_atomic(path.with_suffix(".keys.json"), keys)
        with atomic_open(path) as handle:
            np.save(handle, rows)
        self._pending = {}
        self.refresh()


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An fp16 tensor to gather a batch's rows in. In a DataLoader worker: shared memory, in which the batch reaches
    the main process without another copy (the loader's pin-memory thread pins it there; a forked worker must not
    touch CUDA). In the main process: pinned, so that the copy to the GPU does not block the host."""
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch.float16.itemsize)
        return torch.empty(0, dtype=torch.float16).set_(storage).view(shape)
    return torch.empty(shape, dtype=torch.float16, pin_memory=torch.cuda.is_available())
