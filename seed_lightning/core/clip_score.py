"""CLIP score (text-image) and CLIP image-image similarity, in torchmetrics' convention.

score = max(mean_i 100 * cos(a_i, b_i), 0): torchmetrics 1.9's ``CLIPScore.compute`` clamps the
MEAN of the per-pair scores at 0 (its docstring writes the clamp per pair; the two agree whenever
every cosine is >= 0, which is the case for real CLIP models on image-caption pairs). The same
reduction serves the reconstruction metric (CLIP similarity between an image and the image SD
regenerates from its codes), i.e. torchmetrics' CLIPScore in image-image mode. SEED's papers give
this number on a 0-100 scale; their evaluation code (CLIP model, any clamp) is not public, so
compare with it as "100 x mean cosine".
"""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import CLIPModel, CLIPProcessor

from seed_lightning.core.errors import ConfigError, DataError, first_line
from seed_lightning.core.preflight import is_hub_id

if TYPE_CHECKING:
    from torchmetrics.multimodal.clip_score import CLIPScore

ImageBatch = Tensor | Sequence[Tensor] | Sequence[Image.Image]
"""uint8 images: a [N, 3, H, W] tensor, a list of [3, H, W] tensors, or PIL images."""


def _scaled_cosine_score(features_a: Tensor, features_b: Tensor) -> Tensor:
    if features_a.ndim != 2 or features_a.shape != features_b.shape or features_a.shape[0] == 0:
        raise DataError(
            "CLIP features must be two non-empty [N, D] tensors of one shape, "
            f"got {tuple(features_a.shape)} and {tuple(features_b.shape)}"
        )
    cosine = nn.functional.cosine_similarity(features_a.float(), features_b.float(), dim=-1)
    return (100 * cosine).mean().clamp(min=0)


def clip_score(image_features: Tensor, text_features: Tensor) -> Tensor:
    """CLIP score of paired image and text embeddings [N, D] (unnormalised is fine): a 0-dim tensor in [0, 100]."""
    return _scaled_cosine_score(image_features, text_features)


def image_image_similarity(features_a: Tensor, features_b: Tensor) -> Tensor:
    """CLIP similarity of paired image embeddings [N, D] (e.g. originals vs. SD reconstructions), in [0, 100]."""
    return _scaled_cosine_score(features_a, features_b)


class ProjectedFeaturesCLIPModel(CLIPModel):
    """CLIPModel whose get_image_features/get_text_features return the projected embedding tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (the projection in ``pooler_output``)
    where torchmetrics 1.9 expects a tensor (torchmetrics issue 3407).
    """

    def get_image_features(self, pixel_values: Tensor, *args, **kwargs) -> Tensor:
        return super().get_image_features(pixel_values, *args, **kwargs).pooler_output

    def get_text_features(self, input_ids: Tensor, *args, **kwargs) -> Tensor:
        return super().get_text_features(input_ids, *args, **kwargs).pooler_output


class CLIPScorer(nn.Module):
    """A CLIP model + processor (hub id or local folder) that scores captions and reconstructions.

    Images go through the CLIP processor as torchmetrics feeds them (uint8 tensors or PIL images).
    Captions are cut to the text model's length by the tokenizer, which keeps the end-of-text token
    CLIP pools (torchmetrics cuts after tokenizing; the two agree for captions of <= 77 tokens).
    """

    def __init__(self, model_name_or_path: str = "openai/clip-vit-large-patch14") -> None:
        super().__init__()
        # Fail fast on a mistyped folder instead of asking the hub about a name that cannot exist there.
        if not is_hub_id(model_name_or_path):
            model_name_or_path = str(Path(model_name_or_path).expanduser())
            if not Path(model_name_or_path).is_dir():
                raise ConfigError(
                    f"CLIP model folder {model_name_or_path!r} does not exist: "
                    "pass a hub id (owner/name) or an existing folder"
                )
        try:
            self.model = ProjectedFeaturesCLIPModel.from_pretrained(model_name_or_path).eval()
            self.processor = CLIPProcessor.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"cannot load a CLIP model + processor from {model_name_or_path!r} ({first_line(error)}): "
                "pass a hub id or a folder holding both (CLIPModel.save_pretrained + CLIPProcessor.save_pretrained)"
            ) from error
        self.model.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: ImageBatch) -> Tensor:
        """Projected (unnormalised) CLIP image embeddings [N, E]."""
        images = [image.cpu() if isinstance(image, Tensor) else image for image in images]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values.to(self.device, self.model.dtype))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        """Projected (unnormalised) CLIP text embeddings [N, E]."""
        inputs = self.processor(
            text=list(texts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
        )
        return self.model.get_text_features(
            inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
        )

    def score(self, images: ImageBatch, captions: Sequence[str]) -> Tensor:
        """CLIP score of images against their captions (text-to-image generation quality)."""
        return clip_score(self.image_features(images), self.text_features(captions))

    def image_similarity(self, images_a: ImageBatch, images_b: ImageBatch) -> Tensor:
        """CLIP image-image similarity of paired images (reconstruction quality)."""
        return image_image_similarity(self.image_features(images_a), self.image_features(images_b))

    def torchmetrics_clip_score(self, **metric_kwargs) -> "CLIPScore":
        """A torchmetrics ``CLIPScore`` sharing this model and processor (works with transformers 5)."""
        from torchmetrics.multimodal.clip_score import CLIPScore

        def model_and_processor() -> tuple[CLIPModel, CLIPProcessor]:
            return self.model, self.processor

        return CLIPScore(model_name_or_path=model_and_processor, **metric_kwargs)
