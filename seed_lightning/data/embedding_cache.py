"""A disk cache of per-sample tensors keyed by sample key.

Stage 2 of the tokenizer trains on the causal embeddings of a FROZEN ViT + Q-Former: they are the
same every epoch, so each is computed once, written here, and read back instead of re-running the
encoders. Chunks are safetensors files written atomically; each rank writes its own chunks and
reads everybody's after `refresh()`.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class EmbeddingCache:
    def __init__(self, directory: str | os.PathLike, rank: int = 0, rows_per_chunk: int = 4096):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.rows_per_chunk = rows_per_chunk
        # Flushed rows stay on disk (memory-mapped chunk files); only unflushed ones are in memory.
        self._pending: dict[str, torch.Tensor] = {}
        self._index: dict[str, tuple[int, int]] = {}
        self._chunks: list = []
        self._chunk_paths: set[Path] = set()
        self.refresh()

    def refresh(self) -> None:
        """Index every complete chunk in the directory (those of other ranks too)."""
        for path in sorted(self.directory.glob("chunk-*.safetensors")):
            if path in self._chunk_paths:
                continue
            handle = safe_open(str(path), framework="pt")
            chunk = len(self._chunks)
            self._chunks.append(handle.get_slice("rows"))
            self._chunk_paths.add(path)
            for row, key in enumerate(json.loads(handle.metadata()["keys"])):
                self._index[key] = (chunk, row)

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def __contains__(self, key: str) -> bool:
        return key in self._index or key in self._pending

    def _row(self, key: str) -> torch.Tensor:
        if key in self._pending:
            return self._pending[key]
        chunk, row = self._index[key]
        return self._chunks[chunk][row : row + 1][0]

    def get(self, keys: list[str]) -> torch.Tensor | None:
        """The stacked rows of `keys`, or None when any is missing (the caller then computes them)."""
        if not all(k in self for k in keys):
            return None
        return torch.stack([self._row(k) for k in keys])

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
        index = len(list(self.directory.glob(f"chunk-r{self.rank}-*.safetensors")))
        path = self.directory / f"chunk-r{self.rank}-{index:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        keys = list(self._pending)
        save_file({"rows": torch.stack([self._pending[k] for k in keys])}, str(tmp), metadata={"keys": json.dumps(keys)})
        os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half chunk under a chunk name
        self._pending = {}
        self.refresh()
