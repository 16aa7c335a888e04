"""Collective helpers: an all-gather that keeps gradients flowing (contrastive negatives across ranks), and
validation means that come out the same on any number of ranks."""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torchmetrics import Metric


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
