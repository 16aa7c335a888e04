"""Stable Diffusion's frozen CLIP text encoder: the target of the generation head (stage 2)."""

import os
from typing import Self

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from seed_lightning.core.errors import ConfigError, first_line


class SDTextEncoder(nn.Module):
    """Captions -> `last_hidden_state` [B, 77, D] of the SD text encoder, exactly as the SD pipeline
    computes its conditioning (padded to the full context, truncated, no attention mask). Frozen."""

    def __init__(self, text_model: CLIPTextModel, tokenizer: CLIPTokenizer):
        super().__init__()
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.text_model.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Self:
        """Load `text_encoder/` and `tokenizer/` of a Stable Diffusion folder or hub id."""
        try:
            text_model = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"cannot load the SD text encoder from {path} ({first_line(error)}); "
                "point at a Stable Diffusion folder/hub id with text_encoder/ and tokenizer/"
            ) from None
        return cls(text_model, tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.text_model.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.text_model.config.max_position_embeddings

    def train(self, mode: bool = True) -> Self:
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        input_ids = tokens.input_ids.to(self.text_model.device)
        return self.text_model(input_ids=input_ids).last_hidden_state
