"""Token shards: every image tokenized once into its codes, stored as WebDataset tars.

A sample is `KEY.codes` (the codes as little-endian int16, 64 bytes for 32 codes), `KEY.txt` (the
caption, UTF-8) and `KEY.json` (metadata, sorted keys). Tar headers are fixed (mtime 0, fixed
owner and mode), so the same input gives byte-identical shards. They are read like image shards, by
`seed_lightning.core.data.shards` (`iter_tar_samples`, `decode_codes_sample`).

Extraction is resumable: a shard is written to `NAME.tmp`, renamed when full, and only then recorded
in `{prefix}-manifest.json` (also replaced atomically). A rerun skips the samples of recorded shards
(checking their first and last keys, so a changed input order is caught) and redoes the rest, so
an interruption neither duplicates nor drops samples. Shard i holds input samples
[i * maxcount, (i + 1) * maxcount); several writers (e.g. one per rank) can share a folder with
different prefixes.
"""

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from webdataset import TarWriter

from seed_lightning.core.errors import ConfigError, DataError
from seed_lightning.core.io import write_json_atomic

CODE_LIMIT = 2**15
"""Codes must be below this to fit a signed int16."""


def encode_codes(codes: torch.Tensor) -> bytes:
    """1-D codes -> little-endian int16 bytes."""
    values = torch.as_tensor(codes).flatten().tolist()
    if values and (min(values) < 0 or max(values) >= CODE_LIMIT):
        raise DataError(f"codes must lie in [0, {CODE_LIMIT}) to be stored as int16, got [{min(values)}, {max(values)}]")
    return struct.pack(f"<{len(values)}h", *values)


class TokenShardWriter:
    """Writes token samples into `{prefix}-{index:06d}.tar` shards of `maxcount` samples, resumably.

    Opening a folder that has a manifest continues after its finished shards. Use as a context
    manager: a clean exit finishes the last (partial) shard and marks the set complete; an exception
    discards the unfinished shard, so a rerun redoes exactly those samples.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "tokens", maxcount: int = 10000) -> None:
        if maxcount < 1:
            raise ConfigError(f"maxcount must be >= 1, got {maxcount}; set the number of samples per shard")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.maxcount = maxcount
        self.manifest_path = self.out_dir / f"{prefix}-manifest.json"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        """Finished shards: name, count, first_key, last_key, sha256."""
        self.complete = False
        self._read_manifest()
        for stale in self.out_dir.glob(f"{prefix}-*.tar.tmp"):
            stale.unlink()
        self._tar: TarWriter | None = None
        self._keys: list[str] = []

    def _read_manifest(self) -> None:
        if not self.manifest_path.is_file():
            return
        manifest = json.loads(self.manifest_path.read_text())
        if manifest["maxcount"] != self.maxcount:
            raise ConfigError(f"{self.manifest_path} was written with maxcount {manifest['maxcount']}, not "
                              f"{self.maxcount}; rerun with the same maxcount or write to a new folder")
        for shard in manifest["shards"]:
            if not (self.out_dir / shard["name"]).is_file():
                raise DataError(f"{self.manifest_path} lists {shard['name']} but the file is missing; "
                                "delete the manifest to re-extract everything")
        self.shards = manifest["shards"]
        self.complete = manifest["complete"]

    @property
    def num_done(self) -> int:
        """Samples stored in finished shards."""
        return sum(shard["count"] for shard in self.shards)

    @property
    def shard_paths(self) -> list[Path]:
        return [self.out_dir / shard["name"] for shard in self.shards]

    def write(self, key: str, codes: torch.Tensor, caption: str, meta: dict[str, Any] | None = None) -> None:
        """Append one sample; a full shard is finished (renamed and recorded) at once."""
        if self.complete:
            raise DataError(f"{self.manifest_path} marks this shard set complete; write to a new folder or prefix")
        if not key or "." in key:
            raise DataError(f"sample key {key!r} must be non-empty and contain no '.' (WebDataset splits names at dots)")
        if self._tar is None:
            self._tar = TarWriter(str(self._shard_path(len(self.shards))) + ".tmp", encoder=False,
                                  mtime=0, user="seed", group="seed", mode=0o444)
        record = {
            "__key__": key,
            "codes": encode_codes(codes),
            "txt": caption.encode("utf-8"),
            "json": json.dumps(meta or {}, sort_keys=True).encode("utf-8"),
        }
        self._tar.write(record)
        self._keys.append(key)
        if len(self._keys) == self.maxcount:
            self._finish_shard()

    def close(self) -> None:
        """Finish the partial last shard and mark the shard set complete."""
        if self._tar is not None:
            self._finish_shard()
        self.complete = True
        self._write_manifest()

    def abort(self) -> None:
        """Discard the unfinished shard (its samples are redone by the next run)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            Path(str(self._shard_path(len(self.shards))) + ".tmp").unlink(missing_ok=True)
        self._keys = []

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _finish_shard(self) -> None:
        path = self._shard_path(len(self.shards))
        temporary = Path(str(path) + ".tmp")
        self._tar.close()
        self._tar = None
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
            digest = hashlib.sha256(stream.read()).hexdigest()
        os.replace(temporary, path)
        self.shards.append({"name": path.name, "count": len(self._keys), "first_key": self._keys[0],
                            "last_key": self._keys[-1], "sha256": digest})
        self._keys = []
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {"prefix": self.prefix, "maxcount": self.maxcount, "complete": self.complete, "shards": self.shards}
        write_json_atomic(self.manifest_path, manifest, indent=2)


@dataclass
class ExtractionSummary:
    """What `extract_tokens` produced."""

    shards: list[Path]
    """All finished shards, in order."""
    num_samples: int
    """Samples stored in them."""
    num_resumed: int
    """Samples found already done (skipped) at the start of this run."""


def extract_tokens(
    encode_fn: Callable[[list[Any]], torch.Tensor],
    samples: Iterable[tuple[str, str, dict[str, Any] | None, Any]],
    out_dir: str | Path,
    prefix: str = "tokens",
    maxcount: int = 10000,
    batch_size: int = 64,
) -> ExtractionSummary:
    """Tokenize `samples` = (key, caption, meta, image) into token shards, resuming an interrupted run.

    `encode_fn(images)` gets a list of up to `batch_size` images (whatever the iterable yields:
    pixels, tensors) and returns their codes [B, N]. The input must come in the same order on every
    run; a completed folder is returned as is without reading the input.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    writer = TokenShardWriter(out_dir, prefix, maxcount)
    num_resumed = writer.num_done
    if not writer.complete:
        iterator = iter(samples)
        _skip_finished(iterator, writer)
        with writer:
            batch: list[tuple[str, str, dict[str, Any] | None, Any]] = []
            for sample in iterator:
                batch.append(sample)
                if len(batch) == batch_size:
                    _encode_and_write(encode_fn, batch, writer)
                    batch = []
            if batch:
                _encode_and_write(encode_fn, batch, writer)
    return ExtractionSummary(writer.shard_paths, writer.num_done, num_resumed)


def _skip_finished(iterator: Iterator[tuple], writer: TokenShardWriter) -> None:
    """Consume the samples already stored, checking each finished shard's first and last key."""
    position = 0
    for shard in writer.shards:
        for offset in range(shard["count"]):
            sample = next(iterator, None)
            if sample is None:
                raise DataError(f"the input ends after {position} samples but {writer.out_dir} already holds "
                                f"{writer.num_done}; rerun with the same input or a new folder")
            expected = {0: shard["first_key"], shard["count"] - 1: shard["last_key"]}.get(offset, sample[0])
            if sample[0] != expected:
                raise DataError(f"input differs from the run that wrote {writer.out_dir}: expected key {expected!r} "
                                f"at position {position}, found {sample[0]!r}; rerun with the same input or a new folder")
            position += 1


def _encode_and_write(
    encode_fn: Callable[[list[Any]], torch.Tensor],
    batch: list[tuple[str, str, dict[str, Any] | None, Any]],
    writer: TokenShardWriter,
) -> None:
    codes = torch.as_tensor(encode_fn([image for _, _, _, image in batch]))
    if codes.ndim != 2 or codes.shape[0] != len(batch):
        raise DataError(f"encode_fn returned codes of shape {tuple(codes.shape)} for {len(batch)} images; "
                        "it must return [batch, codes_per_image]")
    for (key, caption, meta, _), sample_codes in zip(batch, codes.cpu()):
        writer.write(key, sample_codes, caption, meta)
