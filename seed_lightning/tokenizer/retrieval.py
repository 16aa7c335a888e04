"""Zero-shot image-text retrieval recall (R@K), in the BLIP / LAVIS ``report_metrics`` convention.

image -> text: the rank of an image is the rank of its BEST-ranked ground-truth text (COCO and
Flickr30K have ~5 captions per image); text -> image: the rank of the text's one image. R@K is the
percentage of queries ranked in the top K; ``mean_R`` averages all R@K of both directions
(LAVIS's ``r_mean``). Ties, which LAVIS's ``argsort`` breaks arbitrarily, count against the model:
a non-matching candidate scoring equal to the best match ranks ahead of it (a collapsed model whose
scores are all equal gets the recall of the worst ranking, not of the best). Without ties this is
exactly LAVIS's number.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from seed_lightning.core.errors import DataError


def _ranks_of_best_match(scores: Tensor, is_match: Tensor) -> Tensor:
    """For each query row: how many non-matching candidates score >= its best-scoring match."""
    best_match = scores.masked_fill(~is_match, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best_match) & ~is_match).sum(dim=1)


def retrieval_recall(
    similarity: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K (percent) of image->text and text->image retrieval from a [N_images, N_texts] similarity.

    `text_to_image[t]` is the index of the image text t describes. Keys: ``i2t_R@K``, ``t2i_R@K``
    for each K, ``i2t_mean``, ``t2i_mean`` and ``mean_R``. K larger than the candidate count gives 100.
    """
    if similarity.ndim != 2:
        raise DataError(f"similarity must be [N_images, N_texts], got shape {tuple(similarity.shape)}")
    num_images, num_texts = similarity.shape
    if text_to_image.shape != (num_texts,) or text_to_image.dtype not in (torch.int32, torch.int64):
        raise DataError(
            f"text_to_image must be an integer tensor of shape ({num_texts},), "
            f"got {text_to_image.dtype} {tuple(text_to_image.shape)}"
        )
    if num_texts == 0 or int(text_to_image.min()) < 0 or int(text_to_image.max()) >= num_images:
        raise DataError(f"text_to_image must hold image indices in [0, {num_images}) for at least one text")
    if torch.isnan(similarity).any():
        raise DataError("similarity holds NaN: check the embeddings (e.g. a zero vector before l2-normalisation)")
    if not ks or any(k < 1 for k in ks):
        raise DataError(f"ks must be positive integers, got {tuple(ks)}")

    similarity = similarity.to(torch.promote_types(similarity.dtype, torch.float32))  # at least fp32; fp64 stays fp64
    text_to_image = text_to_image.to(similarity.device, torch.long)
    is_match = text_to_image.unsqueeze(0) == torch.arange(num_images, device=similarity.device).unsqueeze(1)
    images_without_text = (~is_match.any(dim=1)).nonzero().flatten().tolist()
    if images_without_text:
        raise DataError(
            f"{len(images_without_text)} images have no text (e.g. {images_without_text[:3]}): "
            "drop them from the similarity"
        )

    ranks = {
        "i2t": _ranks_of_best_match(similarity, is_match),
        "t2i": _ranks_of_best_match(similarity.T, is_match.T),
    }
    result: dict[str, float] = {}
    for direction, direction_ranks in ranks.items():
        for k in ks:
            result[f"{direction}_R@{k}"] = 100.0 * int((direction_ranks < k).sum()) / len(direction_ranks)
        result[f"{direction}_mean"] = sum(result[f"{direction}_R@{k}"] for k in ks) / len(ks)
    result["mean_R"] = (result["i2t_mean"] + result["t2i_mean"]) / 2
    return result
