"""The SEED codebook: nearest-neighbour vector quantisation with a straight-through gradient."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor
    """Quantised vectors [..., code_dim]: codebook rows forward, identity to z backward (straight-through)."""
    codes: torch.Tensor
    """LongTensor [...]: index of the nearest codebook row of each vector."""
    loss: torch.Tensor
    """Scalar codebook + commitment loss."""
    z: torch.Tensor
    """The input vectors [..., code_dim]."""


class VectorQuantizer(nn.Module):
    """`nn.Embedding(num_codes, code_dim)` codebook; nearest code by squared L2 (no l2-norm, no EMA).

    loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2), as in the SEED reference code
    (beta weighs the codebook term).
    """

    def __init__(self, num_codes: int = 8192, code_dim: int = 32, beta: float = 0.25):
        super().__init__()
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.embedding = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row (squared L2, computed in fp32) of each vector in z [..., code_dim]."""
        # Under bf16 autocast the distance matmul would round away the differences between nearby codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.reshape(-1, self.code_dim).float()
            codebook = self.embedding.weight.float()
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
            return distances.argmin(dim=1).view(z.shape[:-1])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        codes = self.nearest_codes(z)
        z_q = self.embedding(codes)
        z32 = z.float()
        loss = F.mse_loss(z32, z_q.detach()) + self.beta * F.mse_loss(z_q, z32.detach())
        straight_through = z + (z_q.to(z.dtype) - z).detach()
        return QuantizerOutput(z_q=straight_through, codes=codes, loss=loss, z=z)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook rows of `codes` [...] -> [..., code_dim]."""
        return self.embedding(codes)

    @torch.no_grad()
    def usage(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codebook usage of a batch of codes: fraction of codes used and perplexity (exp of the entropy
        of the code histogram; num_codes when all are used equally, 1 when one code is used)."""
        counts = torch.bincount(codes.flatten(), minlength=self.num_codes).float()
        probs = counts / counts.sum()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        return {"used_fraction": (counts > 0).float().mean(), "perplexity": entropy.exp()}
