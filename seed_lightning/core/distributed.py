"""Where a process stands among the others, and the collectives the package uses: `world()` (rank and world
size of the process group) and `rank_info()` (also before or without one, from the launcher's environment) are the
one place that asks; an all-gather that keeps gradients flowing (contrastive negatives across ranks); per-rank
evaluation outputs gathered and merged by sample index; validation means that come out the same on any number of
ranks.

Validation callbacks keep ``{sample index: prediction}`` per rank, gather the dicts of all ranks, and merge them.
``DistributedSampler`` pads the dataset so every rank gets the same number of samples, so a few indices arrive
twice; merging keeps one of each.
"""

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torchmetrics import Metric


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class RankInfo:
    """This process's place among the launched processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def rank_info() -> RankInfo:
    """From torch.distributed when initialised (`world`), else torchrun's RANK/WORLD_SIZE (or
    LOCAL_RANK/LOCAL_WORLD_SIZE): a launched process that has not joined a process group (extract-tokens) still
    knows its place."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return RankInfo(*world(), local_rank)
    rank = int(os.environ.get("RANK", local_rank))
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return RankInfo(rank, world_size, local_rank)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0; gradients flow back to each rank's own slice.

    torch.distributed.nn's all_gather is autograd-aware: the backward of rank r's slice is the sum of
    that slice's gradients over ranks, so every rank's loss trains every rank's encoder.
    """
    _, world_size = world()
    if world_size == 1:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0)


class ValSetMean(Metric):
    """A weighted mean over the whole val set: `update(value, weight)` every batch, then log the metric itself
    (``self.log(name, metric)``). It sums value x weight and the weights over every rank, so DDP reports what one
    process does; Lightning's ``self.log(value, batch_size=..., sync_dist=True)`` averages the ranks' means and,
    under gloo, divides their summed sample counts in integers (25 samples on 2 ranks: 24). A NaN stays a NaN
    (torchmetrics' MeanMetric either drops NaNs or, with nan_strategy "disable", ignores the weights)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: torch.Tensor | float) -> None:
        self.total += value.detach().double() * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).float()


T = TypeVar("T")


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (all_gather_object: a collective, so call it on all ranks).

    Without an initialised process group (single process) this is ``[obj]``.
    """
    _, world_size = world()
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
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
