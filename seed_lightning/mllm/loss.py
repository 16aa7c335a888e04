"""Next-token cross-entropy of the multimodal LM, computed without the full logits tensor.

The LM head maps every position to ~58k vocabulary logits (OPT's 50k + 8192 visual codes). Computing
them for a whole batch and casting them to fp32 for the loss moves several GB per step through
memory, and autograd keeps them for the backward pass. `target_token_losses` instead runs the head
only on positions that have a target, a chunk of tokens at a time, and recomputes each chunk's
logits in the backward pass (activation checkpointing): peak memory holds one chunk's logits, and
the losses are the same numbers as `token_losses` on full logits.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seed_lightning.mllm.packing import IGNORE_INDEX


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [R, L] of predicting `labels[:, t]` from position t-1 (Hugging Face's unshifted labels).

    Position 0 and IGNORE_INDEX labels get 0.
    """
    shifted = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape[0], -1)
    return F.pad(shifted, (1, 0))


def _chunk_losses(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def target_token_losses(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """`token_losses(head(hidden), labels)` [R, L] without materialising the logits of the batch.

    Args:
        hidden: last hidden states [R, L, D] (the LM's output before its head), on the compute device.
        head: the LM head (hidden -> vocabulary logits); its weights get gradients as usual.
        labels: unshifted targets [R, L] with IGNORE_INDEX where there is none. A CPU copy costs no
            device synchronisation: the target positions are found on the host.
        chunk_tokens: tokens per head call; each chunk's fp32 logits are chunk_tokens x vocabulary x 4 bytes.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    rows, length = labels.shape
    shifted = labels[:, 1:].reshape(-1)
    # Position p of the flattened [R, L-1] grid predicts labels[r, t+1] from hidden[r, t].
    positions = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    device = hidden.device
    positions_here = positions.to(device, non_blocking=True)
    targets = shifted[positions].to(device, non_blocking=True)
    inputs = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions_here)
    pieces = []
    for start in range(0, len(positions), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_losses, head, inputs[chunk], targets[chunk], use_reentrant=False))
        else:
            pieces.append(_chunk_losses(head, inputs[chunk], targets[chunk]))
    losses = torch.zeros(rows * (length - 1), dtype=torch.float32, device=device)
    if pieces:
        losses = losses.index_put((positions_here,), torch.cat(pieces))
    return F.pad(losses.view(rows, length - 1), (1, 0))
