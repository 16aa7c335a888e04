"""A disk cache of per-sample tensors keyed by sample key.

Stage 2 of the tokenizer trains on the causal embeddings of a FROZEN ViT + Q-Former: they are the
same every epoch, so each is computed once, written here, and read back instead of re-running the
encoders. Chunks are fp16 `.npy` files, memory-mapped when read (a batch is one fancy-indexed read
per chunk, and the cache can be far larger than RAM), each with a `.keys.json` naming its rows.
Both are written atomically (`core/io.py`; the keys first, so an `.npy` under its final
name always has its keys). Each rank writes its own chunks and reads everybody's after `refresh()`.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

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
        self._chunk_paths: set[Path] = set()
        self.refresh()

    def refresh(self) -> None:
        """Index every complete chunk in the directory (those of other ranks too)."""
        for path in sorted(self.directory.glob("chunk-*.npy")):
            if path in self._chunk_paths:
                continue
            keys = json.loads(path.with_suffix(".keys.json").read_text())
            chunk = len(self._chunks)
            self._chunks.append(np.load(path, mmap_mode="r"))
            self._chunk_paths.add(path)
            for row, key in enumerate(keys):
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
        # Pinned, so that the copy to the GPU does not block the host.
        out = torch.empty(len(keys), *shape, dtype=torch.float16, pin_memory=torch.cuda.is_available())
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
