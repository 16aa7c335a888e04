"""ShardDataModule: WebDataset shards -> deterministic, exactly resumable train batches and rank-split val batches.

Train stream. Each rank runs `max(1, num_workers)` logical workers, each an endless `TrainStream` seeded from
(seed, rank, worker). Global batch g of a rank (counted from the start of training, across epochs) is made by
logical worker g % W. Batching happens inside the DataLoader workers (DataLoader batch_size=None) and the
DataLoader hands out worker outputs round-robin, so a DataLoader iteration that starts at global batch g0
simply lets DataLoader worker i play logical worker (g0 + i) % W. An iteration yields the batches from g0 up to
the next multiple of `batches_per_epoch` (= samples_per_epoch // (world_size * batch_size), the same on every
rank, so DDP ranks never wait on each other's data). This matches how Lightning 2.6 continues an epoch after a
mid-epoch restart: it restores its batch counter k and asks the train loader for the remaining
`len(loader) - k` batches of the epoch.

Batch transforms. A LightningModule may hand the data module a function per split (`connect`, as litgpt's
`DataModule.connect` hands its data the tokenizer) that turns each collated batch into what its steps take,
e.g. tokenised and packed rows; the DataLoader workers apply it, so that host work overlaps the steps. It gets
the batch's rank and index: train batch g of a rank has index g (see above), val batch b of `val_batches` has
index b, so a transform seeded by them is as deterministic and resumable as the stream.

Exact resume. Every train batch carries its producer's `StreamState` (taken right after that batch).
`on_after_batch_transfer` (runs in the main process just before `training_step` of that batch) strips it and
records it with the count of batches consumed; `state_dict()` (gathered from all ranks: only rank 0 writes the
checkpoint) persists them and `load_state_dict()` (Lightning calls it before building the train loader)
restores them. The next iteration then re-creates each logical worker from its last consumed state: nothing
is replayed or decoded, and batches prefetched but never trained on are simply made again. Positions belong to
global ranks, so any launch layout of the same number of ranks continues exactly (2 nodes x 1 process and 1 node x
2 processes alike); a checkpoint of another number of ranks is refused with a ConfigError when fitting.
"""

import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from seed_lightning.core.data.shards import (
    IMAGE_EXTENSIONS,
    SampleDecoder,
    SampleRef,
    ShardProblems,
    ShardReader,
    SkipSample,
    StreamState,
    TrainStream,
    collate_samples,
    expand_urls,
    index_tar,
    make_decoder,
)
from seed_lightning.core.data.transforms import ImageTransform
from seed_lightning.core.distributed import gather_objects
from seed_lightning.core.errors import ConfigError, DataError, SeedLightningError

STREAM_STATE_KEY = "_stream_state"
"""Private train-batch entry holding the producer's StreamState; removed before the LightningModule sees it."""
_STATE_FORMAT = 1

BatchTransform = Callable[[dict[str, Any], int, int], dict[str, Any]]
"""(collated batch, rank, index) -> the batch dict the LightningModule receives; run in the DataLoader workers, so
picklable (a bound method of a plain object, no lambda) and free of models. See the module docstring for index."""


@dataclass
class ShardSource:
    """One training data source: a set of shards and its share of the mixed stream."""

    urls: str = ""
    """Shard files: brace/glob patterns separated by '::', e.g. data/cc3m/train-{000000..000331}.tar."""
    weight: float = 1.0
    """Relative share of training samples drawn from this source (samples, not shards)."""


class ResumeBook:
    """What the main process knows about this rank's train stream: how many batches were consumed (`batches`),
    the state of every logical worker after its last consumed batch, and the batch count at which the streams
    were (re)started (part of their seeds)."""

    def __init__(self, num_workers: int) -> None:
        self.batches = 0
        self.started_at = 0
        self.states: list[StreamState | None] = [None] * num_workers

    def record(self, state: StreamState) -> None:
        self.states[state.worker] = state
        self.batches += 1

    def restart(self, batches: int) -> None:
        """Fresh streams from `batches` on (new seeds, so a changed configuration does not replay old data)."""
        self.batches = self.started_at = batches
        self.states = [None] * len(self.states)

    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for state in self.states:
            if state is not None:
                total.update(state.skipped)
        return dict(total)

    def as_dict(self) -> dict[str, Any]:
        states = [None if s is None else s.as_dict() for s in self.states]
        return {"batches": self.batches, "started_at": self.started_at, "states": states}

    def load(self, state: dict[str, Any]) -> None:
        self.batches, self.started_at = state["batches"], state["started_at"]
        self.states = [None if s is None else StreamState.from_dict(s) for s in state["states"]]


class _WorkerError:
    """A SeedLightningError raised in a DataLoader worker, passed to the main process as a batch: torch would
    re-raise it there with the worker's whole traceback as its message instead of the one line."""

    def __init__(self, error: SeedLightningError) -> None:
        self.error = error


def _errors_as_batches(batches: Iterator[dict[str, Any]]) -> Iterator[Any]:
    """`batches`; in a worker process, a SeedLightningError ends them as a final `_WorkerError`."""
    try:
        yield from batches
    except SeedLightningError as error:
        if get_worker_info() is None:
            raise
        yield _WorkerError(error)


class ShardTrainDataset(IterableDataset):
    """The train stream of one rank for one DataLoader iteration (see the module docstring)."""

    def __init__(
        self,
        sources: Sequence[Sequence[str]],
        weights: Sequence[float],
        decode: SampleDecoder,
        batch_size: int,
        shuffle_buffer: int,
        batches_per_epoch: int,
        seed: int,
        rank: int,
        book: ResumeBook,
        transform: BatchTransform | None = None,
    ) -> None:
        self.sources = sources
        self.weights = weights
        self.decode = decode
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.rank = rank
        self.book = book
        self.transform = transform

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        return _errors_as_batches(self._batches())

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers != len(self.book.states):
            raise ConfigError(
                f"train DataLoader has {num_workers} workers but the stream was set up for {len(self.book.states)}:"
                " build it with ShardDataModule.train_dataloader()"
            )
        start = self.book.batches
        remaining = self.batches_per_epoch - start % self.batches_per_epoch
        logical = (start + worker) % num_workers
        stream = TrainStream(
            self.sources,
            self.weights,
            self.decode,
            self.batch_size,
            self.shuffle_buffer,
            worker=logical,
            stream_id=f"seed-lightning/{self.seed}/rank{self.rank}/worker{logical}/from{self.book.started_at}",
            state=self.book.states[logical],
        )
        try:
            for index in range(start + worker, start + remaining, num_workers):
                batch = stream.next_batch()
                state = stream.state()
                if self.transform is not None:
                    batch = self.transform(batch, self.rank, index)
                batch[STREAM_STATE_KEY] = state
                yield batch
        finally:
            stream.report_problems()
            stream.close()


def val_batches(num_samples: int, batch_size: int, world_size: int) -> list[range]:
    """The val set's batches, in order: `batch_size` samples each (the last one fewer), whatever the world size. A
    val set with fewer such batches than ranks is cut into one near-equal batch per rank instead: every rank must
    validate (the epoch ends in collectives), and only then do the batches depend on the world size."""
    if math.ceil(num_samples / batch_size) < world_size:
        cuts = [num_samples * k // world_size for k in range(world_size + 1)]
        return [range(start, end) for start, end in zip(cuts, cuts[1:])]
    return [range(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]


class ShardValDataset(IterableDataset):
    """Validation samples of one rank: batch b of `val_batches` goes to rank b % world_size. A batch thus holds the
    same samples on any number of ranks, so DDP computes what one process does (batched arithmetic, e.g. a
    convolution, rounds differently with other batch-mates). Each sample once (no padding duplicates); a rank's
    k-th batch is made by DataLoader worker k % num_workers, so the DataLoader's round-robin returns the batches in
    order. Batches carry `index` (positions in the val set)."""

    def __init__(
        self,
        refs: Sequence[SampleRef],
        decode: SampleDecoder,
        batch_size: int,
        rank: int,
        world_size: int,
        transform: BatchTransform | None = None,
    ) -> None:
        self.refs = refs
        batches = val_batches(len(refs), batch_size, world_size)
        self.batches = batches[rank::world_size]
        self.numbers = range(rank, len(batches), world_size)
        """Each of this rank's batches' number among all val batches (the transform's index)."""
        self.rank = rank
        self.decode = decode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        return _errors_as_batches(self._batches())

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader, skipped = ShardReader(), Counter()
        try:
            for number, batch_indices in zip(self.numbers[worker::num_workers], self.batches[worker::num_workers]):
                samples, indices = [], []
                for index in batch_indices:
                    try:
                        samples.append(self.decode(reader.read(self.refs[index]), random.Random(index)))
                        indices.append(index)
                    except SkipSample as skip:
                        skipped[skip.reason] += 1
                if samples:
                    batch = {**collate_samples(samples), "index": torch.tensor(indices, dtype=torch.long)}
                    yield batch if self.transform is None else self.transform(batch, self.rank, number)
        finally:
            reader.close()
            if skipped:
                warnings.warn(f"validation skipped unusable samples: {dict(skipped)}")


class ShardDataModule(LightningDataModule):
    """WebDataset image shards (KEY.jpg + KEY.txt [+ KEY.json]) or token shards (KEY.codes + KEY.txt) ->
    batches as described in docs/DESIGN.md. Train: weighted mix of resampled shards, deterministic per
    (seed, rank, worker) and exactly resumable from any checkpoint. Val: every sample once over all ranks."""

    def __init__(
        self,
        train: list[ShardSource] | str | None = None,
        val: str | None = None,
        kind: Literal["image", "codes"] = "image",
        codes_per_image: int = 32,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        jpeg_draft: bool = True,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        samples_per_epoch: int = 100_000,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        max_words: int = 50,
        prefetch_factor: int = 2,
    ) -> None:
        """
        Args:
            train: Training sources (shard patterns with mixing weights), e.g. [{urls: 'shards/{000000..000099}.tar'}];
                required for fitting. (A plain string is accepted by the parser only to be refused with that hint.)
            val: Validation shards ('::'-separated brace/glob patterns), read in order; None for no validation.
            kind: "image" for image-text shards (pixel_values), "codes" for token shards (codes
                LongTensor[B, codes_per_image]).
            codes_per_image: Codes per image in token shards (kind "codes"): the tokenizer's number of queries.
                `seed-lightning mllm` sets it from the module (model.model.tokens_per_image), not from the YAML.
            image_size: Side of the square images fed to the model, in pixels.
            crop_scale: Area fraction range of the training random-resized crop.
            hflip: Randomly flip training images horizontally.
            jpeg_draft: Decode large JPEGs at reduced scale (never below image_size): several times faster loading,
                pixels slightly different from a full-size decode. False decodes every image at full size.
            batch_size: Training batch size per rank (per GPU).
            val_batch_size: Validation batch size per rank; None means batch_size.
            num_workers: DataLoader worker processes per rank (0 = load in the main process).
            samples_per_epoch: Training samples per epoch summed over all ranks (the stream itself is endless).
            shuffle_buffer: Sample references each worker shuffles among (costs no memory beyond the references).
            seed: Seed of the training streams (with the rank and worker index).
            max_words: Captions are truncated to this many words after cleaning.
            prefetch_factor: Batches each DataLoader worker prepares ahead.
        """
        if isinstance(train, str):
            raise ConfigError(_not_a_source_list(train))
        # Plain data only (no ShardSource objects), so checkpoints load with torch.load(weights_only=True).
        hyperparameters = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        train = list(train or [])
        self.save_hyperparameters({**hyperparameters, "train": [asdict(source) for source in train]})
        if kind not in ("image", "codes"):
            raise ConfigError(f"data.kind must be 'image' or 'codes', got {kind!r}")
        if any(source.weight <= 0 for source in train):
            raise ConfigError(f"data.train weights must be > 0, got {[source.weight for source in train]}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
        for name, value, low in [
            ("codes_per_image", codes_per_image, 1),
            ("image_size", image_size, 1),
            ("batch_size", batch_size, 1),
            ("val_batch_size", val_batch_size or batch_size, 1),
            ("num_workers", num_workers, 0),
            ("samples_per_epoch", samples_per_epoch, 1),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("max_words", max_words, 1),
            ("prefetch_factor", prefetch_factor, 1),
        ]:
            if value < low:
                raise ConfigError(f"data.{name} must be >= {low}, got {value}")
        self.train_sources = train
        self.val = val
        self.kind = kind
        self.codes_per_image = codes_per_image
        self.image_size = image_size
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.jpeg_draft = jpeg_draft
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.max_words = max_words
        self.prefetch_factor = prefetch_factor
        self._book = ResumeBook(max(1, num_workers))
        self._train_urls: list[list[str]] | None = None
        self._val_refs: list[SampleRef] | None = None
        self._train_transform: BatchTransform | None = None
        self._val_transform: BatchTransform | None = None

    def connect(self, train: BatchTransform | None = None, val: BatchTransform | None = None) -> None:
        """From the next loader on, the DataLoader workers turn every train / val batch into `train(batch, rank,
        index)` / `val(batch, rank, index)` (see the module docstring); None leaves that split's batches as
        collated. A LightningModule calls this from its `setup`."""
        self._train_transform = train
        self._val_transform = val

    @property
    def skipped(self) -> dict[str, int]:
        """Training samples skipped so far on this rank, by reason, summed over workers (exact across resumes)."""
        return self._book.skipped()

    @classmethod
    def check_requirements(cls, init_args: dict[str, Any], stage: str) -> None:
        """The shards that `stage` reads exist (see `seed_lightning.core.preflight`)."""
        if isinstance(init_args["train"], str):
            raise ConfigError(_not_a_source_list(init_args["train"]))
        patterns = [("data.train", source["urls"]) for source in init_args["train"] or []] if stage == "fit" else []
        if init_args["val"] is not None:
            patterns.append(("data.val", init_args["val"]))
        made_by = "; token shards are made by seed-lightning extract-tokens" if init_args["kind"] == "codes" else ""
        for option, pattern in patterns:
            try:
                expand_urls(pattern)
            except DataError as error:
                raise DataError(f"{option}: {error}{made_by}") from None

    def setup(self, stage: str) -> None:
        """Expand and check the shard patterns and index the val shards: DataError on missing files or on a
        validation set without a usable sample; damaged val shards are warned about, one line per kind."""
        if stage == "fit" and self._train_urls is None:
            self._train_urls = [expand_urls(source.urls) for source in self.train_sources]
        if self.val is not None and self._val_refs is None and stage in ("fit", "validate"):
            self._val_refs = self._index_val()

    def _index_val(self) -> list[SampleRef]:
        urls = expand_urls(self.val)
        refs, problems = [], ShardProblems()
        for url in urls:
            index = index_tar(url)
            if index.problem is not None:
                problems.add(url, index)
            refs.extend(index.samples)
        wanted = IMAGE_EXTENSIONS if self.kind == "image" else ("codes",)
        if not any(extension in wanted for ref in refs for extension, _, _ in ref.members):
            found = "; ".join(problems.lines()) or f"{len(refs)} samples, none with a {'/'.join(wanted)} member"
            raise DataError(
                f"data.val {self.val!r} ({len(urls)} files) has no usable sample ({found}): give uncompressed .tar"
                f" shards of KEY.{wanted[0]} + KEY.txt samples, or set data.val: null to train without validation"
            )
        problems.warn("validation shards")
        return refs

    def train_dataloader(self) -> DataLoader:
        if not self.train_sources:
            raise ConfigError("no training data: set data.train to a list of {urls: <shard pattern>, weight: 1.0}")
        self.setup("fit")
        rank, world_size = self._rank_and_world_size()
        batches_per_epoch = self.samples_per_epoch // (world_size * self.batch_size)
        if batches_per_epoch == 0:
            raise ConfigError(
                f"data.samples_per_epoch={self.samples_per_epoch} is less than one global batch"
                f" ({world_size} ranks x batch_size {self.batch_size}): raise it or lower batch_size"
            )
        dataset = ShardTrainDataset(
            self._train_urls,
            [source.weight for source in self.train_sources],
            make_decoder(self.kind, self._transform(train=True), self.max_words, self.codes_per_image),
            self.batch_size,
            self.shuffle_buffer,
            batches_per_epoch,
            self.seed,
            rank,
            self._book,
            self._train_transform,
        )
        return self._loader(dataset, _ResumableLoader)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        self.setup("validate")
        rank, world_size = self._rank_and_world_size()
        decode = make_decoder(self.kind, self._transform(train=False), self.max_words, self.codes_per_image)
        dataset = ShardValDataset(self._val_refs, decode, self.val_batch_size, rank, world_size, self._val_transform)
        return self._loader(dataset, _ShardLoader)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record (and strip) the stream state of a train batch that is about to be trained on."""
        if isinstance(batch, dict) and STREAM_STATE_KEY in batch:
            self._book.record(batch.pop(STREAM_STATE_KEY))
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Stream positions of all ranks (a collective under DDP: Lightning calls this on every rank)."""
        local = self._book.as_dict()
        ranks = gather_objects(local)
        return {"format": _STATE_FORMAT, "fingerprint": self._fingerprint(), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.trainer is not None and self.trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict never read the train stream: its saved position is irrelevant there
        rank, world_size = self._rank_and_world_size()
        ranks = state_dict.get("ranks") or []
        if ranks and len(ranks) != world_size:
            raise ConfigError(self._other_world_size(len(ranks), world_size))
        if state_dict.get("format") == _STATE_FORMAT and state_dict.get("fingerprint") == self._fingerprint():
            self._book.load(ranks[rank])
            return
        batches = ranks[0]["batches"] if ranks else 0
        warnings.warn(
            "the checkpoint's data stream does not match this data configuration (shards, weights, kind, batch"
            " size, workers, shuffle buffer or seed changed): training continues on fresh streams, not exactly"
            " where it stopped",
            stacklevel=2,
        )
        self._book.restart(batches)

    def _other_world_size(self, saved: int, world_size: int) -> str:
        """Why a fit checkpoint of `saved` processes does not resume on `world_size`, and what to do instead. The
        train stream is one position per rank, and the global batch (the contrastive loss's negatives) is ranks x
        batch_size: neither carries over to another number of ranks, whatever nodes they sit on."""
        checkpoint = getattr(self.trainer, "ckpt_path", None) or "the checkpoint"
        return (
            f"{checkpoint} was written by {saved} processes and this run has {world_size} (trainer.num_nodes x"
            f" trainer.devices): its data stream positions (one per process) and global batch ({saved} x"
            f" {self.batch_size}) only continue on {saved}; resume with num_nodes x devices = {saved} (any split"
            " over nodes), or start a new run in another output folder"
        )

    def _fingerprint(self) -> dict[str, Any]:
        """What the saved stream positions are only valid for."""
        return {
            "train": [[source.urls, float(source.weight)] for source in self.train_sources],
            "kind": self.kind,
            "batch_size": self.batch_size,
            "workers": max(1, self.num_workers),
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            "world_size": self._rank_and_world_size()[1],
        }

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _transform(self, train: bool) -> ImageTransform:
        return ImageTransform(
            image_size=self.image_size, train=train, scale=self.crop_scale, hflip=self.hflip, jpeg_draft=self.jpeg_draft
        )

    def _loader(self, dataset: IterableDataset, loader_class: type["_ShardLoader"]) -> DataLoader:
        # persistent_workers stays off: each iteration must re-create its workers from the main process's record
        # of consumed batches (the logical-worker assignment shifts between iterations, and batches a persistent
        # worker prefetched but nobody trained on would be lost). Re-forking costs well under a second per epoch.
        workers = self.num_workers
        return loader_class(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            persistent_workers=False,
            # Its own generator: creating an iterator then draws its base seed from here, not from the global
            # torch RNG, whose state (dropout masks) must not depend on when iterators are created (exact resume).
            generator=torch.Generator().manual_seed(self.seed),
        )


def _not_a_source_list(value: str) -> str:
    """What to write instead of a bare path or pattern as data.train."""
    expected = "data.train expects a list of sources such as [{urls: 'shards/{000000..000099}.tar'}]"
    if os.path.isdir(value):
        pattern = os.path.join(value, "*.tar")
        return (f"{expected}; got {value!r}, a directory: give a pattern of .tar shards inside it,"
                f" e.g. [{{urls: '{pattern}'}}]")
    what = "the file" if os.path.isfile(value) else "the string"
    return f"{expected}; got {what} {value!r}: write [{{urls: '{value}'}}]"


class _ShardLoader(DataLoader):
    """A DataLoader that raises a worker's SeedLightningError as the worker raised it (see `_WorkerError`)."""

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, _WorkerError):
                raise batch.error
            yield batch


class _ResumableLoader(_ShardLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch (so Lightning does not warn that it cannot). Its
    own state is empty: ShardDataModule saves and restores the stream positions, before this loader iterates."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

