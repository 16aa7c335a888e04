"""Next-token cross-entropy of the multimodal LM, computed without the full logits tensor.

The LM head maps every position to ~58k vocabulary logits (OPT's 50k + 8192 visual codes). Computing
them for a whole batch and casting them to fp32 for the loss moves several GB per step through
memory, and autograd keeps them for the backward pass. `chunked_token_losses` runs the head a chunk
of positions at a time and recomputes each chunk's logits in the backward pass (activation
checkpointing): peak memory holds one chunk's logits, and the losses are the same numbers as
`token_losses` on full logits. Every position goes through the head, targets or not: selecting the
target positions would need their count on the host, a device synchronisation per step.
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
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def chunked_token_losses(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """`token_losses(head(hidden), labels)` [R, L] without materialising the logits of the batch.

    Args:
        hidden: last hidden states [R, L, D] (the LM's output before its head).
        head: the LM head (hidden -> vocabulary logits); its weights get gradients as usual.
        labels: unshifted targets [R, L] on hidden's device, IGNORE_INDEX where there is none.
        chunk_tokens: positions per head call; each chunk's fp32 logits are chunk_tokens x vocabulary x 4 bytes.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    inputs = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    pieces = []
    for start in range(0, len(targets), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_losses, head, inputs[chunk], targets[chunk], use_reentrant=False))
        else:
            pieces.append(_chunk_losses(head, inputs[chunk], targets[chunk]))
    return F.pad(torch.cat(pieces).view(labels.shape[0], -1), (1, 0))
