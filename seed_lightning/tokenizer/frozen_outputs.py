"""Stage 2's cached frozen-tower outputs, attached to the training batches in the DataLoader workers.

`FrozenOutputs` holds `CodebookModule`'s two disk caches (`EmbeddingCache`: causal embeddings per image, L_gen
targets per caption) and attaches what they hold to a training batch: `causal_embeds` in place of the pixels when
every image of the batch is cached, `generation_targets` when every caption is. `CodebookModule.setup` connects it
to the data module (`ShardDataModule.connect`): the workers gather the rows from the memory-mapped chunks while the
GPU runs the previous steps, and the batch reaches the main process in shared memory, where the loader pins it (the
copy to the GPU then does not block). `CodebookModule.transfer_batch_to_device` attaches, with the same `attach`,
what a batch still lacks: every batch of a loader that runs no transform (the benches' plain DataLoader), and rows
a worker cannot see (written by the main process after the worker started and not yet flushed).

A worker starts with the caches as they were when it started (re-created every epoch: `ShardDataModule` keeps no
persistent workers, and the module flushes and re-indexes its caches at the end of each epoch, before the next
epoch's workers start); when a batch is not all cached it also indexes the chunks written since.
"""

import hashlib
from dataclasses import dataclass
from typing import Any

from torch.utils.data import get_worker_info

from seed_lightning.tokenizer.embedding_cache import EmbeddingCache

CAUSAL_EMBEDS = "causal_embeds"
GENERATION_TARGETS = "generation_targets"


def image_keys(batch: dict[str, Any]) -> list[str]:
    """The causal-embedding cache's keys of the batch's images."""
    # Keys repeat across data sets (img2dataset numbers every set from 0): qualify them by shard.
    urls = batch.get("url") or [""] * len(batch["key"])
    return [f"{url}#{key}" for url, key in zip(urls, batch["key"])]


def caption_keys(captions: list[str]) -> list[str]:
    """The L_gen-target cache's keys of `captions`."""
    # The target depends on the caption text alone: images that share a caption share its row.
    return [hashlib.sha1(caption.encode()).hexdigest() for caption in captions]


@dataclass
class FrozenOutputs:
    """The disk caches of the frozen towers' outputs (picklable: it travels to the DataLoader workers)."""

    embeddings: EmbeddingCache
    targets: EmbeddingCache | None
    """None without L_gen."""

    @property
    def caches(self) -> list[EmbeddingCache]:
        return [cache for cache in (self.embeddings, self.targets) if cache is not None]

    def attach(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with the cached outputs it lacks and the caches hold all of; a batch given its causal embeddings
        travels without its pixels."""
        if "pixel_values" in batch:
            embeddings = self.embeddings.get(image_keys(batch))
            if embeddings is not None:
                batch = {**{k: v for k, v in batch.items() if k != "pixel_values"}, CAUSAL_EMBEDS: embeddings}
        if self.targets is not None and GENERATION_TARGETS not in batch:
            targets = self.targets.get(caption_keys(batch["caption"]))
            if targets is not None:
                batch = {**batch, GENERATION_TARGETS: targets}
        return batch

    def lacks(self, batch: dict[str, Any]) -> bool:
        """Whether `batch` misses an output that the caches may hold."""
        return "pixel_values" in batch or (self.targets is not None and GENERATION_TARGETS not in batch)

    def __call__(self, batch: dict[str, Any], rank: int, index: int) -> dict[str, Any]:
        """The train batch transform (see the module docstring)."""
        batch = self.attach(batch)
        if get_worker_info() is not None and self.lacks(batch):
            for cache in self.caches:
                cache.refresh()
            batch = self.attach(batch)
        return batch
