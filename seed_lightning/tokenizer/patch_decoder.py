"""A tiny image decoder for the synthetic default world: a plain conditional decoder network, not diffusion.

Stable Diffusion small enough to train on a CPU in minutes learns nothing recognisable in that time, so
`make data` trains this instead (``devkit/tiny_decoder.py``), conditioned exactly as SD is: the SD text
encoder's [B, 77, D] caption embeddings in, an image out. Its folder holds ``decoder/config.json`` +
``decoder/model.safetensors`` beside the text encoder and tokenizer it was trained on (``text_encoder/``,
``tokenizer/``: the folder also serves as the tokenizer's `generation_target`); `ImageDecoder.from_pretrained`
(image_decoder.py) loads it behind the interface every image decoder has.

It is deterministic, and a regression network draws the average of what its conditioning leaves open; it was
trained on the default world's scenes redrawn in a canonical layout that the caption fixes (see
devkit/tiny_decoder.py), so it draws the shapes, colours and rows a caption names in that layout. It reads the
embedding as a whole, word positions included (an MLP, no attention): it learns the default world's few
caption forms in a CPU minute or two, and nothing beyond them.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.io import write_json_atomic

CONFIG_FILE = "decoder/config.json"
"""The file that marks a folder as a PatchDecoder's."""
WEIGHTS_FILE = "decoder/model.safetensors"


def is_patch_decoder(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / CONFIG_FILE).is_file()


@dataclass
class PatchDecoderConfig:
    """Sizes of the tiny decoder."""

    embedding_dim: int = 64
    """Width D of the conditioning embeddings (the SD text encoder's hidden size)."""
    num_tokens: int = 77
    """Length of the conditioning embeddings (the SD text encoder's context)."""
    image_size: int = 64
    """Side of the square output image, in pixels."""
    grid_size: int = 8
    """Patches per side: each is an (image_size / grid_size)^2 square of pixels."""
    hidden_size: int = 512
    """Width of the MLP that reads the whole embedding."""
    patch_channels: int = 64
    """Features it writes per patch."""
    patch_hidden_size: int = 256
    """Width of the MLP, shared by all patches, that turns a patch's features into its pixels."""

    def __post_init__(self) -> None:
        if self.image_size % self.grid_size:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of grid_size {self.grid_size}")


class PatchDecoder(nn.Module):
    """An MLP reads the whole [num_tokens, D] embedding (a caption's words in their places) and writes features
    for each of grid_size^2 patches; a small MLP shared by the patches turns each patch's features into its
    pixels."""

    def __init__(self, config: PatchDecoderConfig) -> None:
        super().__init__()
        self.config = config
        flat, hidden, channels = config.num_tokens * config.embedding_dim, config.hidden_size, config.patch_channels
        patch = config.image_size // config.grid_size
        self.read = nn.Sequential(
            nn.LayerNorm(flat), nn.Linear(flat, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, config.grid_size**2 * channels),
        )
        self.draw = nn.Sequential(
            nn.GELU(), nn.Linear(channels, config.patch_hidden_size), nn.GELU(),
            nn.Linear(config.patch_hidden_size, 3 * patch * patch),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, num_tokens, D] -> RGB in [0, 1], [B, 3, image_size, image_size]."""
        batch, grid = embeddings.shape[0], self.config.grid_size
        features = self.read(embeddings.flatten(1))
        patches = self.draw(features.view(batch, grid * grid, -1))  # [B, patches, 3 * patch^2]
        patches = patches.transpose(1, 2).reshape(batch, -1, grid, grid)
        return torch.sigmoid(nn.functional.pixel_shuffle(patches, self.config.image_size // grid))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes decoder/model.safetensors, then decoder/config.json (which marks the folder), under `folder`."""
        folder = Path(folder)
        (folder / CONFIG_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_model(self, str(folder / WEIGHTS_FILE))
        write_json_atomic(folder / CONFIG_FILE, asdict(self.config), indent=2)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Self:
        folder = Path(folder).expanduser()
        decoder = cls(PatchDecoderConfig(**json.loads((folder / CONFIG_FILE).read_text())))
        load_model(decoder, str(folder / WEIGHTS_FILE))
        return decoder
