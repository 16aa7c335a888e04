"""WebDataset shard pipeline, as small named stages.

    expand_urls -> index_tar (sample references: member offsets) -> WeightedMixer (resampled shards per source,
    one source per sample by weight) -> ShuffleBuffer (of references) -> ShardReader (bytes) ->
    decode_image_sample / decode_codes_sample (skips counted by reason) -> collate_samples

`TrainStream` chains them for one logical worker. Shuffling references instead of decoded samples makes a
large buffer free and makes the stream's entire position small enough to ride along with every batch as a
plain-data `StreamState`, so a resumed run continues exactly, without replaying or decoding anything.
Shards must be uncompressed local tars (the img2dataset / webdataset layout: KEY.ext members, consecutive
members with the same KEY form one sample).
"""

import glob
import io
import json
import os
import random
import re
import struct
import sys
import tarfile
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, BinaryIO, Literal, NamedTuple

import braceexpand
import torch
from PIL import Image

from seed_lightning.core.data.text import clean_caption
from seed_lightning.core.data.transforms import ImageTransform
from seed_lightning.core.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image members looked for in a sample, in this order."""
MAX_CONSECUTIVE_SKIPS = 1000
"""A stream that skips this many samples (or draws this many empty shards) in a row stops with a DataError."""

_KEY_EXT_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split: key up to the basename's first dot
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
"""What PIL raises on corrupt, truncated or unsupported image data (UnidentifiedImageError is an OSError)."""


class SkipSample(Exception):
    """A sample cannot be used; `reason` is the key it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SampleRef(NamedTuple):
    """Where one sample lives: its shard, its key and its members as (extension, byte offset, byte size)."""

    url: str
    key: str
    members: tuple[tuple[str, int, int], ...]


class ShardIndex(NamedTuple):
    """The samples of one shard in file order, and what was wrong with the file (None if nothing)."""

    samples: list[SampleRef]
    problem: str | None
    damage: str | None = None
    """The kind of problem, what repeated problems are counted under: "empty file", "not a tar archive",
    "truncated", "unreadable member header" or "unreadable file"."""


SampleDecoder = Callable[[dict[str, Any], random.Random], dict[str, Any]]
"""Raw sample (member bytes) + the sample's own rng -> decoded sample; raises SkipSample."""


def expand_urls(pattern: str) -> list[str]:
    """Shard paths from '::'-separated patterns with brace ranges ("train-{000000..000009}.tar") or globs, in order.

    Raises DataError naming a missing file, a glob that matches nothing, or an empty pattern.
    """
    urls: list[str] = []
    for part in pattern.split("::"):
        if not part.strip():
            raise DataError(f"empty shard pattern in {pattern!r}: give a path or brace pattern between '::'")
        for path in braceexpand.braceexpand(os.path.expanduser(part.strip())):
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise DataError(f"shard pattern {path!r} matches no file: check the directory and the pattern")
                urls.extend(matches)
            elif os.path.isfile(path):
                urls.append(path)
            elif os.path.isdir(path):
                raise DataError(
                    f"shard path {path!r} is a directory; give a pattern of .tar shards inside it, e.g."
                    f" {os.path.join(path, '*.tar')}"
                )
            else:
                raise DataError(f"shard file {path!r} not found: check the path and the brace range")
    return urls


def index_tar(url: str) -> ShardIndex:
    """Read a tar's member headers (not its data) and group consecutive members by key into sample references.

    A truncated or corrupt tar keeps the complete samples before the damage (the sample at the damage is
    dropped) and reports the problem; it never raises.
    """
    samples: list[SampleRef] = []
    key: str | None = None
    members: list[tuple[str, int, int]] = []
    problem = damage = None
    try:
        file_size = os.path.getsize(url)
        with open(url, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
            for info in tar:
                match = _KEY_EXT_RE.match(info.name) if info.isfile() else None
                if match is None:
                    continue
                if match.group(1) != key:
                    if members:
                        samples.append(SampleRef(url, key, tuple(members)))
                    key, members = match.group(1), []
                if info.offset_data + info.size > file_size:
                    problem, damage = f"member {info.name!r} is cut off (truncated file)", "truncated"
                    break
                # Interned: one string object per extension keeps pickled stream states small.
                members.append((sys.intern(match.group(2).lower()), info.offset_data, info.size))
            else:
                problem, damage = _end_of_archive_problem(file, tar.offset, file_size)
    except tarfile.TarError as error:
        problem = f"{type(error).__name__}: {error}"
        damage = "empty file" if file_size == 0 else "not a tar archive"
    except OSError as error:
        problem, damage = f"{type(error).__name__}: {error}", "unreadable file"
    if members and problem is None:
        samples.append(SampleRef(url, key, tuple(members)))
    return ShardIndex(samples, problem, damage)


def _end_of_archive_problem(file: BinaryIO, offset: int, file_size: int) -> tuple[str | None, str | None]:
    """tarfile ends quietly at a cut-off or garbled header; a sound tar ends in two zero blocks there."""
    if file_size - offset < 2 * tarfile.BLOCKSIZE:
        return "no end-of-archive marker (truncated file)", "truncated"
    file.seek(offset)
    if file.read(tarfile.BLOCKSIZE).strip(b"\0"):
        return f"unreadable member header at byte {offset}", "unreadable member header"
    return None, None


def report_shard_problem(url: str, index: ShardIndex, skipped: Counter) -> None:
    """Count a damaged shard under "bad_shard" and warn (Python shows each distinct message once per process)."""
    skipped["bad_shard"] += 1
    warnings.warn(f"shard {url}: {index.problem}; using its first {len(index.samples)} complete samples", stacklevel=2)


class ShardProblems:
    """Damaged shards by kind of damage, reported in one line per kind (with the count and the first shard)
    rather than one line per shard: a glob of 4,268 images is one line, not 4,268."""

    def __init__(self) -> None:
        self._shards: dict[str, dict[str, str]] = {}  # damage -> {url: problem}, in the order met

    def add(self, url: str, index: ShardIndex) -> None:
        self._shards.setdefault(index.damage, {}).setdefault(url, index.problem)

    def lines(self) -> list[str]:
        """One line per kind of damage: '<count> shard(s) <kind> (first: <url>: <problem>)'."""
        lines = []
        for damage, shards in self._shards.items():
            url, problem = next(iter(shards.items()))
            lines.append(f"{len(shards)} shard(s) {damage} (first: {url}: {problem})")
        return lines

    def warn(self, where: str) -> None:
        """Warn one line per kind of damage and forget them."""
        for line in self.lines():
            warnings.warn(f"{where}: {line}; the complete samples before any damage are used", stacklevel=2)
        self._shards.clear()


class ShardReader:
    """Reads samples by reference, keeping the most recently used shard files open."""

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self._files: OrderedDict[str, BinaryIO] = OrderedDict()

    def read(self, ref: SampleRef) -> dict[str, Any]:
        """{"__key__", "__url__", extension: bytes, ...}; raises SkipSample("unreadable_sample") on I/O failure."""
        sample: dict[str, Any] = {"__key__": ref.key, "__url__": ref.url}
        try:
            file = self._open(ref.url)
            for extension, offset, size in ref.members:
                file.seek(offset)
                sample[extension] = file.read(size)
                if len(sample[extension]) != size:
                    raise SkipSample("unreadable_sample")
        except OSError:
            raise SkipSample("unreadable_sample") from None
        return sample

    def _open(self, url: str) -> BinaryIO:
        if url in self._files:
            self._files.move_to_end(url)
            return self._files[url]
        if len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].close()
        self._files[url] = open(url, "rb")  # noqa: SIM115 - closed on eviction or close()
        return self._files[url]

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


def iter_tar_samples(url: str, skipped: Counter | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in file order ({"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}).

    Damage stops the shard after its last complete sample, with a warning and a "bad_shard" count in `skipped`.
    """
    skipped = Counter() if skipped is None else skipped
    index = index_tar(url)
    if index.problem is not None:
        report_shard_problem(url, index, skipped)
    reader = ShardReader(max_open=1)
    try:
        for ref in index.samples:
            try:
                yield reader.read(ref)
            except SkipSample as skip:
                skipped[skip.reason] += 1
    finally:
        reader.close()


def _caption(raw: dict[str, Any], max_words: int) -> str:
    if raw.get("txt") is None:
        raise SkipSample("missing_caption")
    caption = clean_caption(raw["txt"].decode("utf-8", errors="replace"), max_words)
    if not caption:
        raise SkipSample("empty_caption")
    return caption


def _meta(raw: dict[str, Any]) -> dict[str, Any]:
    if raw.get("json") is None:
        return {}
    try:
        meta = json.loads(raw["json"])
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SkipSample("bad_json") from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json")
    return meta


def decode_image_sample(
    raw: dict[str, Any],
    rng: random.Random,
    transform: Callable[[Image.Image, random.Random], torch.Tensor],
    max_words: int = 50,
) -> dict[str, Any]:
    """Raw sample -> {"pixel_values": FloatTensor[3,S,S], "caption": cleaned str, "key", "meta": dict}, with
    `transform(image, rng)` (an `ImageTransform`, or token extraction's inference preprocessing).

    Skips (SkipSample reason): missing_image, corrupt_image, missing_caption, empty_caption, bad_json.
    """
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if extension is None:
        raise SkipSample("missing_image")
    caption, meta = _caption(raw, max_words), _meta(raw)  # cheap checks before the expensive decode
    try:
        pixel_values = transform(Image.open(io.BytesIO(raw[extension])), rng)
    except IMAGE_ERRORS:
        raise SkipSample("corrupt_image") from None
    return {"pixel_values": pixel_values, "caption": caption, "key": raw["__key__"], "url": raw.get("__url__", ""), "meta": meta}


def decode_codes_sample(
    raw: dict[str, Any], rng: random.Random, codes_per_image: int, max_words: int = 50
) -> dict[str, Any]:
    """Raw token-shard sample -> {"codes": LongTensor[codes_per_image], "caption", "key", "meta"}; `rng` is unused.
    KEY.codes holds `codes_per_image` little-endian int16 codes (as many as the tokenizer has queries).

    Skips: missing_codes, bad_codes (wrong length or negative), missing_caption, empty_caption, bad_json.
    """
    data = raw.get("codes")
    if data is None:
        raise SkipSample("missing_codes")
    if len(data) != 2 * codes_per_image:
        raise SkipSample("bad_codes")
    values = struct.unpack(f"<{codes_per_image}h", data)
    if min(values) < 0:
        raise SkipSample("bad_codes")
    caption, meta = _caption(raw, max_words), _meta(raw)
    codes = torch.tensor(values, dtype=torch.long)
    return {"codes": codes, "caption": caption, "key": raw["__key__"], "url": raw.get("__url__", ""), "meta": meta}


def make_decoder(
    kind: Literal["image", "codes"], transform: ImageTransform, max_words: int, codes_per_image: int
) -> SampleDecoder:
    """The decode stage for image shards (with `transform`) or token shards (of `codes_per_image` codes)."""
    if kind == "image":
        return partial(decode_image_sample, transform=transform, max_words=max_words)
    return partial(decode_codes_sample, codes_per_image=codes_per_image, max_words=max_words)


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> a batch dict: tensors stacked on a new first dim, everything else as lists."""
    return {
        name: torch.stack([s[name] for s in samples]) if isinstance(first, torch.Tensor) else [s[name] for s in samples]
        for name, first in samples[0].items()
    }


class ShuffleBuffer:
    """webdataset-style shuffle: keeps `size` items, returns a random one and refills from the source.

    `items` is its whole content (besides the rng), so a copy of it is a checkpoint. `size` 0 passes through.
    """

    def __init__(self, size: int, rng: random.Random, items: list | None = None) -> None:
        self.size = size
        self.rng = rng
        self.items = [] if items is None else items

    def draw(self, pull: Callable[[], Any]) -> Any:
        while len(self.items) < self.size:
            self.items.append(pull())
        if not self.items:
            return pull()
        position = self.rng.randrange(len(self.items))
        self.items[position], self.items[-1] = self.items[-1], self.items[position]
        return self.items.pop()


class WeightedMixer:
    """Picks a source for each sample with probability proportional to its weight; each source walks shards drawn
    uniformly with replacement ("resampled" shards, so no rank or worker ever runs dry) in file order.

    `positions()` = per source (current shard or None, next sample index) is its state besides the rng.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[str]],
        weights: Sequence[float],
        rng: random.Random,
        skipped: Counter,
        positions: Sequence[tuple[str | None, int]] | None = None,
    ) -> None:
        self.sources = sources
        self.rng = rng
        self.skipped = skipped
        self.problems = ShardProblems()
        self._source_ids = list(range(len(sources)))
        self._cum_weights = [sum(weights[: i + 1]) for i in range(len(weights))]
        self._shards: list[str | None] = [None] * len(sources)
        self._samples: list[list[SampleRef]] = [[] for _ in sources]
        self._next: list[int] = [0] * len(sources)
        for source, (url, position) in enumerate(positions or []):
            if url is not None:  # re-read the header of the shard a restored stream was in the middle of
                self._shards[source], self._samples[source] = url, index_tar(url).samples
                self._next[source] = position

    def positions(self) -> list[tuple[str | None, int]]:
        return list(zip(self._shards, self._next))

    def next_ref(self) -> SampleRef:
        source = self.rng.choices(self._source_ids, cum_weights=self._cum_weights)[0]
        empty_draws = 0
        while self._next[source] >= len(self._samples[source]):
            if empty_draws >= MAX_CONSECUTIVE_SKIPS:
                found = "; ".join(self.problems.lines()) or f"last: {self._shards[source]}"
                self.problems = ShardProblems()  # told here, not warned again
                raise DataError(
                    f"train source {source} gave {empty_draws} empty shards in a row ({found}):"
                    " check that its shards are uncompressed tars with samples"
                )
            url = self.rng.choice(self.sources[source])
            index = index_tar(url)
            if index.problem is not None:
                self.skipped["bad_shard"] += 1
                self.problems.add(url, index)
            self._shards[source], self._samples[source], self._next[source] = url, index.samples, 0
            empty_draws += 1
        self._next[source] += 1
        return self._samples[source][self._next[source] - 1]


class StreamState:
    """A `TrainStream`'s whole position after a batch, as plain data (ints, strings, tuples, lists, dicts).

    A plain class on purpose: Lightning's collection utilities leave it alone while moving the batch it rides in
    (dataclasses, tuples and dicts would be walked and copied).
    """

    __slots__ = ("worker", "stream_id", "rng_state", "positions", "buffer", "samples_drawn", "batches", "skipped")

    def __init__(
        self,
        worker: int,
        stream_id: str,
        rng_state: tuple,
        positions: list[tuple[str | None, int]],
        buffer: list[tuple],
        samples_drawn: int,
        batches: int,
        skipped: dict[str, int],
    ) -> None:
        self.worker = worker
        self.stream_id = stream_id
        self.rng_state = rng_state
        self.positions = positions
        self.buffer = buffer
        self.samples_drawn = samples_drawn
        self.batches = batches
        self.skipped = skipped

    def as_dict(self) -> dict[str, Any]:
        """Checkpointable form (loads with torch.load(weights_only=True))."""
        state = {name: getattr(self, name) for name in self.__slots__}
        state["buffer"] = [(ref[0], ref[1], tuple(ref[2])) for ref in self.buffer]  # SampleRef -> plain tuple
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "StreamState":
        return cls(**state)


class TrainStream:
    """One logical worker's endless training stream of batches (see the module docstring for the stages).

    Sample n of the stream is augmented with its own rng seeded from (stream_id, n), so its crop does not depend
    on how many random numbers earlier samples used. `state()` after a batch + `TrainStream(..., state=...)`
    continue exactly where it stopped.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[str]],
        weights: Sequence[float],
        decode: SampleDecoder,
        batch_size: int,
        shuffle_buffer: int,
        worker: int,
        stream_id: str,
        state: StreamState | None = None,
    ) -> None:
        self.decode = decode
        self.batch_size = batch_size
        self.worker = worker
        self.stream_id = stream_id
        self.rng = random.Random(stream_id)
        self.skipped: Counter = Counter()
        self.samples_drawn = 0
        self.batches = 0
        positions, buffer = None, None
        if state is not None:
            self.stream_id = state.stream_id
            self.rng.setstate(state.rng_state)
            self.skipped.update(state.skipped)
            self.samples_drawn, self.batches = state.samples_drawn, state.batches
            positions, buffer = state.positions, [SampleRef(*ref) for ref in state.buffer]
        self.mixer = WeightedMixer(sources, weights, self.rng, self.skipped, positions)
        self.buffer = ShuffleBuffer(shuffle_buffer, self.rng, buffer)
        self.reader = ShardReader()

    def next_batch(self) -> dict[str, Any]:
        samples: list[dict[str, Any]] = []
        skips_in_a_row = 0
        while len(samples) < self.batch_size:
            ref = self.buffer.draw(self.mixer.next_ref)
            sample_rng = random.Random(f"{self.stream_id}/{self.samples_drawn}")
            self.samples_drawn += 1
            try:
                samples.append(self.decode(self.reader.read(ref), sample_rng))
                skips_in_a_row = 0
            except SkipSample as skip:
                self.skipped[skip.reason] += 1
                skips_in_a_row += 1
                if skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                    raise DataError(
                        f"{skips_in_a_row} train samples in a row were unusable (so far: {dict(self.skipped)}):"
                        " check the shards' members (image/caption/codes) against data.kind"
                    ) from None
        self.batches += 1
        return collate_samples(samples)

    def state(self) -> StreamState:
        return StreamState(
            worker=self.worker,
            stream_id=self.stream_id,
            rng_state=self.rng.getstate(),
            positions=self.mixer.positions(),
            buffer=list(self.buffer.items),
            samples_drawn=self.samples_drawn,
            batches=self.batches,
            skipped=dict(self.skipped),
        )

    def report_problems(self) -> None:
        """Warn about the damaged shards drawn since the last report: one line per kind of damage."""
        self.mixer.problems.warn(f"train stream {self.worker}")

    def close(self) -> None:
        self.reader.close()
