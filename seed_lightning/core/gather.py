"""Collect per-rank evaluation outputs under DDP, without Lightning.

Validation callbacks keep ``{sample index: prediction}`` per rank, gather the dicts of all ranks,
and merge them. ``DistributedSampler`` pads the dataset so every rank gets the same number of
samples, so a few indices arrive twice; merging keeps one of each.
"""

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (all_gather_object: a collective, so call it on all ranks).

    Without an initialised process group (single process) this is ``[obj]``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def merge_by_index(per_rank: Iterable[Mapping[int, T]]) -> dict[int, T]:
    """Merge per-rank ``{index: value}`` dicts into one, sorted by index.

    An index seen on several ranks (sampler padding) keeps the value of the lowest rank, so the
    result does not depend on which rank finished first.
    """
    merged: dict[int, T] = {}
    for rank_outputs in per_rank:
        for index, value in rank_outputs.items():
            merged.setdefault(index, value)
    return dict(sorted(merged.items()))
