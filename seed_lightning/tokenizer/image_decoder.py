"""Generation embeddings -> images: SEED v1's Stable Diffusion, or the tiny decoder of the default world.

`ImageDecoder.from_pretrained` picks by what it is given: a folder holding ``decoder/config.json`` is the tiny
decoder that `make data` trains on the synthetic default world (`TinyImageDecoder`, a `PatchDecoder` network:
patch_decoder.py, devkit/tiny_decoder.py); anything else is a diffusers Stable Diffusion folder or hub id
(`StableDiffusionDecoder`, e.g. CompVis/stable-diffusion-v1-4).
Both take what the tokenizer's generation head imitates: the SD text encoder's [B, 77, D] caption embeddings.

With Stable Diffusion the generation embeddings go in as ``prompt_embeds``; classifier-free guidance uses SD's
own text encoder on "" as the unconditional embedding, as the reference sampling does (50 steps, guidance 7.5,
seed 42).
"""

import os
from collections.abc import Sequence
from typing import Self

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from torch import nn

from seed_lightning.core.errors import ConfigError, DataError, first_line
from seed_lightning.core.preflight import check_pretrained, is_hub_id
from seed_lightning.tokenizer.patch_decoder import PatchDecoder, is_patch_decoder


def check_image_decoder(source: str, option: str) -> None:
    """Preflight: `source` is a tiny decoder folder, or a Stable Diffusion folder / hub id that can be loaded."""
    if not is_patch_decoder(source):
        check_pretrained(source, option, marker="model_index.json",
                         how="point it at a Stable Diffusion folder or hub id, or at a tiny decoder folder (make data builds one)")


class ImageDecoder(nn.Module):
    """[B, tokens, D] generation embeddings -> B PIL images, frozen. `from_pretrained` loads either kind (see the
    module docstring)."""

    @property
    def embedding_dim(self) -> int:
        """Width D of the embeddings it decodes (= the generation head's out_dim)."""
        raise NotImplementedError

    def forward(self, generation_embeddings: torch.Tensor, seeds: Sequence[int] | None = None) -> list[Image.Image]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> Self:
        return super().train(False)  # frozen: dropout stays off

    def check_embeddings(self, generation_embeddings: torch.Tensor) -> None:
        if generation_embeddings.ndim != 3 or generation_embeddings.shape[-1] != self.embedding_dim:
            raise DataError(
                f"generation embeddings must be [B, tokens, {self.embedding_dim}] for this image decoder, got "
                f"{tuple(generation_embeddings.shape)}: set the generation head's out_dim to the SD text width"
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int = 42,
        height: int | None = None,
        width: int | None = None,
    ) -> "ImageDecoder":
        """A tiny decoder folder (deterministic: the sampling settings do not apply to it) or a Stable Diffusion
        folder / hub id sampled with these settings."""
        if is_patch_decoder(path):
            return TinyImageDecoder.from_pretrained(path)
        return StableDiffusionDecoder.from_pretrained(path, num_inference_steps, guidance_scale, seed, height, width)


class StableDiffusionDecoder(ImageDecoder):
    """A frozen StableDiffusionPipeline (no safety checker) fed generation embeddings. Deterministic:
    image i starts from noise drawn with seed ``seeds[i]`` (default: `seed` for every image), so an
    image's noise does not depend on the batch it was generated in (its pixels can, by rounding)."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int = 42,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        if num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.pipeline = pipeline
        # Registered as submodules so that .to() / .eval() reach them.
        self.unet, self.vae, self.text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
        self.requires_grad_(False)
        self.eval()
        pipeline.set_progress_bar_config(disable=True)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.height = height
        self.width = width

    @classmethod
    def from_pretrained(
        cls,
        sd_path: str | os.PathLike,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int = 42,
        height: int | None = None,
        width: int | None = None,
    ) -> Self:
        """Load a diffusers Stable Diffusion folder or hub id (UNet, VAE, scheduler, text encoder, tokenizer)."""
        sd_path = str(sd_path)
        # A mistyped folder fails here instead of as a hub request for a name that cannot exist there.
        if not is_hub_id(sd_path) and not os.path.isdir(os.path.expanduser(sd_path)):
            raise ConfigError(f"Stable Diffusion folder {sd_path!r} does not exist: pass a hub id (owner/name) or a folder")
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                os.path.expanduser(sd_path), safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"cannot load Stable Diffusion from {sd_path!r} ({first_line(error)}): "
                "point at a diffusers StableDiffusionPipeline folder or hub id"
            ) from None
        return cls(pipeline, num_inference_steps, guidance_scale, seed, height, width)

    @property
    def embedding_dim(self) -> int:
        """Width of the conditioning the UNet cross-attends to (= the generation head's out_dim)."""
        return self.unet.config.cross_attention_dim

    @torch.no_grad()
    def unconditional_embedding(self) -> torch.Tensor:
        """SD's text encoder on "" padded to the full context: [1, 77, D] (the negative prompt embedding)."""
        tokenizer = self.pipeline.tokenizer
        tokens = tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def forward(self, generation_embeddings: torch.Tensor, seeds: Sequence[int] | None = None) -> list[Image.Image]:
        """[B, 77, D] generation embeddings -> B PIL images; the pipeline moves to their device and dtype."""
        self.check_embeddings(generation_embeddings)
        batch = generation_embeddings.shape[0]
        seeds = [self.seed] * batch if seeds is None else list(seeds)
        if len(seeds) != batch:
            raise DataError(f"got {len(seeds)} seeds for {batch} images: pass one seed per image")
        self.pipeline.to(generation_embeddings.device, generation_embeddings.dtype)
        negative = self.unconditional_embedding().to(generation_embeddings.dtype).expand(batch, -1, -1)
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        return self.pipeline(
            prompt_embeds=generation_embeddings,
            negative_prompt_embeds=negative,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generators,
            height=self.height,
            width=self.width,
            output_type="pil",
        ).images


class TinyImageDecoder(ImageDecoder):
    """The tiny decoder of the default world (a `PatchDecoder` network), frozen. Deterministic: the same
    embeddings give the same image; `seeds` are accepted for the interface and do not matter."""

    def __init__(self, network: PatchDecoder) -> None:
        super().__init__()
        self.network = network
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Self:
        return cls(PatchDecoder.from_pretrained(path))

    @property
    def embedding_dim(self) -> int:
        return self.network.config.embedding_dim

    @torch.no_grad()
    def forward(self, generation_embeddings: torch.Tensor, seeds: Sequence[int] | None = None) -> list[Image.Image]:
        self.check_embeddings(generation_embeddings)
        if generation_embeddings.shape[1] != self.network.config.num_tokens:
            raise DataError(f"the tiny decoder reads [B, {self.network.config.num_tokens}, D] embeddings, got "
                            f"{tuple(generation_embeddings.shape)}: give it the SD text encoder's full context")
        weight = next(self.network.parameters())
        pixels = self.network(generation_embeddings.to(weight.device, weight.dtype)).float().cpu()
        pixels = pixels.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return [Image.fromarray(image.numpy(), "RGB") for image in pixels]
