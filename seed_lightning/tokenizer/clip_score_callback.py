"""CLIP score of generated images on validation, and the tokenizer's reconstruction CLIP similarity.

- MLLM module (has ``.mllm`` and ``.seed_tokenizer``): text-to-image from val captions
  (``mllm.generate_image_codes`` -> ``seed_tokenizer.decode`` -> image decoder) -> val/clip_score.
- the tokenizer's CodebookModule (has ``.tokenizer`` and ``trains_codebook``): every val image regenerated from
  its own 32 codes -> val/recon_clip_similarity (image-image, the paper's reconstruction metric) and
  val/recon_clip_score (regenerated image vs its caption). Nothing in stage 1 (ContrastiveModule): the
  codebook and generation head are not trained yet.

Both in torchmetrics' CLIPScore convention (100 x mean cosine, clamped at 0), with one CLIP model
(hub id or local folder) for every number. A grid goes to TensorBoard: val/reconstructions (original |
regenerated, caption under it) or val/generated_images (the MLLM's images, caption under each).
"""

from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image

from seed_lightning.core.clip_score import CLIPScorer, clip_score, image_image_similarity
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.image_grid import image_grid, to_chw_tensor
from seed_lightning.core.preflight import check_pretrained
from seed_lightning.core.validation import (
    IndexedValidationCallback,
    add_to_tensorboard,
    check_positive,
    evaluates_now,
    publish,
    require_attribute,
)
from seed_lightning.tokenizer.image_decoder import ImageDecoder, check_image_decoder


def denormalize(pixel_values: torch.Tensor, mean, std) -> list[Image.Image]:
    """Normalised pixels [B, 3, H, W] -> RGB PIL images (the inverse of the data pipeline's normalisation)."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return [Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB") for image in pixels]


class CLIPScoreCallback(IndexedValidationCallback):
    """Generates images for the first `num_images` val samples and scores them with CLIP (see module doc)."""

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        sd_path: str = "CompVis/stable-diffusion-v1-4",
        num_images: int = 16,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int = 42,
        temperature: float = 1.0,
        top_k: int | None = None,
        grid_images: int = 8,
        every_n_epochs: int = 1,
    ) -> None:
        """
        Args:
            clip_model: CLIP model + processor scoring the images (hub id or a folder holding both; default: the
                paper's).
            sd_path: Image decoder of the generation embeddings: Stable Diffusion (diffusers folder or hub id; default:
                the paper's) or a tiny decoder folder (`make data` trains one for the default world; it ignores the
                sampling settings).
            num_images: Val samples (the first by val index) generated and scored per evaluation.
            num_inference_steps: Diffusion sampling steps (reference: 50).
            guidance_scale: Classifier-free guidance scale (reference: 7.5).
            seed: Seed of the diffusion noise (every image) and, plus the val index, of the MLLM's code sampling.
            temperature: Sampling temperature of the MLLM's visual tokens.
            top_k: Top-k filter of the MLLM's visual token sampling (None: no filter).
            grid_images: Samples shown in the TensorBoard image grid (0: no grid).
            every_n_epochs: Evaluate after every n-th training epoch (trainer.validate always evaluates).
        """
        super().__init__(every_n_epochs)
        check_positive(num_images=num_images, num_inference_steps=num_inference_steps, top_k=top_k)
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.clip_model = clip_model
        self.sd_path = sd_path
        self.num_images = num_images
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.temperature = temperature
        self.top_k = top_k
        self.grid_images = grid_images
        self.scorer: CLIPScorer | None = None
        self.decoder: ImageDecoder | None = None

    @classmethod
    def check_requirements(cls, init_args: dict[str, Any], stage: str) -> None:
        """The CLIP model and the image decoder exist as folders, in the Hugging Face cache or on the hub (see
        `seed_lightning.core.preflight`)."""
        check_pretrained(init_args["clip_model"], f"{cls.__name__} clip_model")
        check_image_decoder(init_args["sd_path"], f"{cls.__name__} sd_path")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "mllm"):
            require_attribute(pl_module, "seed_tokenizer", type(self).__name__)
        else:
            require_attribute(pl_module, "tokenizer", type(self).__name__)
        if self.scorer is None:  # kept out of the LightningModule: never in its checkpoint or optimizer
            self.scorer = CLIPScorer(self.clip_model)
            self.decoder = ImageDecoder.from_pretrained(
                self.sd_path, num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                seed=self.seed,
            )

    def active(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        generates = hasattr(pl_module, "mllm") or getattr(pl_module, "trains_codebook", False)
        return generates and evaluates_now(trainer, self.every_n_epochs)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        if self.active(trainer, pl_module):
            self.scorer.to(pl_module.device)
            self.decoder.to(pl_module.device)

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> dict[int, dict[str, Any]]:
        indices = batch["index"].tolist()
        rows = [row for row, index in enumerate(indices) if index < self.num_images]
        if not rows:
            return {}
        captions = [batch["caption"][row] for row in rows]
        if hasattr(pl_module, "mllm"):
            originals = None
            codes = torch.cat([
                pl_module.mllm.generate_image_codes(
                    [caption], temperature=self.temperature, top_k=self.top_k, seed=self.seed + indices[row]
                )
                for row, caption in zip(rows, captions)
            ])
            tokenizer = pl_module.seed_tokenizer
        else:
            tokenizer = pl_module.tokenizer
            pixel_values = batch["pixel_values"][rows]
            originals = denormalize(pixel_values, tokenizer.config.image_mean, tokenizer.config.image_std)
            codes = tokenizer.encode(pixel_values)
        regenerated = self.decoder(tokenizer.decode(codes.to(pl_module.device)))
        regenerated_features = self.scorer.image_features(regenerated).float().cpu()
        text_features = self.scorer.text_features(captions).float().cpu()
        original_features = None if originals is None else self.scorer.image_features(originals).float().cpu()
        outputs = {}
        for position, (row, caption) in enumerate(zip(rows, captions)):
            index = indices[row]
            shown = index < self.grid_images
            outputs[index] = {
                "caption": caption,
                "regenerated": regenerated_features[position],
                "text": text_features[position],
                "original": None if original_features is None else original_features[position],
                # The grid's row: original | regenerated (MLLM: regenerated only).
                "images": (([] if originals is None else [originals[position]]) + [regenerated[position]])
                if shown else None,
            }
        return outputs

    def finish(
        self, trainer: L.Trainer, pl_module: L.LightningModule, merged: dict[int, dict[str, Any]], directory: Path
    ) -> None:
        metrics = None
        if trainer.is_global_zero and merged:
            metrics = self.score(list(merged.values()))
            shown = [row for row in merged.values() if row["images"] is not None]
            if shown:
                grid = image_grid([row["images"] for row in shown], [row["caption"] for row in shown])
                directory.mkdir(parents=True, exist_ok=True)
                grid.save(directory / f"clip_grid_epoch{trainer.current_epoch}.png")
                tag = "val/reconstructions" if shown[0]["original"] is not None else "val/generated_images"
                add_to_tensorboard(trainer, "image", tag, to_chw_tensor(grid))
        publish(trainer, pl_module, metrics, prog_bar=("val/clip_score", "val/recon_clip_similarity"))

    @staticmethod
    def score(rows: list[dict[str, Any]]) -> dict[str, float]:
        """CLIP metrics of merged rows: features of regenerated images, captions and (tokenizer) originals."""
        regenerated = torch.stack([row["regenerated"] for row in rows])
        text = torch.stack([row["text"] for row in rows])
        if rows[0]["original"] is None:
            return {"val/clip_score": float(clip_score(regenerated, text))}
        original = torch.stack([row["original"] for row in rows])
        return {
            "val/recon_clip_similarity": float(image_image_similarity(original, regenerated)),
            "val/recon_clip_score": float(clip_score(regenerated, text)),
        }
