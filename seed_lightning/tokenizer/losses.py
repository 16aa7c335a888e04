"""Losses of the tokenizer stages."""

import torch
import torch.nn.functional as F

from seed_lightning.core.distributed import all_gather_with_grad, world


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, temperature: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Symmetric image-text contrastive loss (BLIP-2 ITC) with negatives from every rank.

    Features are l2-normalised [b, E] on this rank; each rank scores its own rows against the
    gathered columns of all ranks, so the positives sit at offset rank * b.
    """
    rank, _ = world()
    all_images = all_gather_with_grad(image_features)
    all_texts = all_gather_with_grad(text_features)
    logits_i2t = image_features @ all_texts.t() / temperature
    logits_t2i = text_features @ all_images.t() / temperature
    targets = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    loss_i2t = F.cross_entropy(logits_i2t.float(), targets, label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(logits_t2i.float(), targets, label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2


def cosine_reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) over tokens: the stage-2 reconstruction of the causal embeddings."""
    return (1 - F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()
