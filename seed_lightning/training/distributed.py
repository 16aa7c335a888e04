"""Collective helpers that keep gradients flowing (for contrastive negatives across ranks)."""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


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
