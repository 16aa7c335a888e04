"""The frozen image encoder: BLIP-2's EVA-CLIP ViT-g/14 followed by `ln_vision`."""

import dataclasses
from dataclasses import dataclass
from typing import Self

import torch
from torch import nn
from transformers import Blip2Config, Blip2VisionConfig, Blip2VisionModel

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.pretrained import load_hf_config, load_into, load_state_dict, sub_state_dict


@dataclass
class VisionEncoderConfig:
    """The ViT: from a BLIP-2 checkpoint when `pretrained` is set, otherwise random with the dims below."""

    pretrained: str | None = None
    """BLIP-2 checkpoint (folder/hub id, e.g. Salesforce/blip2-opt-2.7b) or Blip2VisionModel folder; its dims win."""
    image_size: int = 224
    """Input resolution in pixels (square)."""
    patch_size: int = 14
    """Patch size in pixels."""
    hidden_size: int = 1408
    """Token width of the ViT (ViT-g: 1408)."""
    num_layers: int = 39
    """Number of transformer blocks."""
    num_heads: int = 16
    """Attention heads per block."""
    mlp_size: int = 6144
    """Hidden width of each block's MLP."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon inside the ViT blocks (EVA ViT-g: 1e-6)."""
    ln_vision_eps: float = 1e-5
    """Epsilon of `ln_vision`. The official BLIP-2 / SEED code uses torch's LayerNorm default (1e-5); Hugging Face's
    Blip2VisionModel gives its post_layernorm the blocks' epsilon instead, so it is set separately here."""
    qkv_bias: bool = True
    """Whether the attention projections have q/v biases."""
    trainable: bool = False
    """Train the whole tower; only sensible for small random towers (the spec freezes it)."""
    train_ln_vision: bool = True
    """Train `ln_vision` (the LayerNorm after the ViT) while the trunk is frozen (stage 1 does)."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision: image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}) "
                f"and hidden_size ({self.hidden_size}) of num_heads ({self.num_heads})"
            )

    def resolved(self) -> "VisionEncoderConfig":
        """This config with the dims of the `pretrained` checkpoint filled in (unchanged when None)."""
        if self.pretrained is None:
            return self
        hf_config, _ = _checkpoint_vision_config(self.pretrained)
        return dataclasses.replace(
            self,
            image_size=hf_config.image_size,
            patch_size=hf_config.patch_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            mlp_size=hf_config.intermediate_size,
            layer_norm_eps=hf_config.layer_norm_eps,
            qkv_bias=hf_config.qkv_bias,
        )

    def to_hf(self) -> Blip2VisionConfig:
        return Blip2VisionConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.mlp_size,
            layer_norm_eps=self.layer_norm_eps,
            qkv_bias=self.qkv_bias,
            # BLIP-2's default (1e-10) makes a random tower output nearly the same tokens for every image.
            initializer_range=0.02,
            attn_implementation="sdpa",
        )


def _checkpoint_vision_config(path: str) -> tuple[Blip2VisionConfig, str]:
    """The ViT config of a BLIP-2 / Blip2VisionModel checkpoint and the prefix of its ViT tensors."""
    hf_config = load_hf_config(path)
    if isinstance(hf_config, Blip2Config):
        return hf_config.vision_config, "vision_model."
    if isinstance(hf_config, Blip2VisionConfig):
        return hf_config, ""
    raise ConfigError(f"vision.pretrained: {path} is a {type(hf_config).__name__}, not a BLIP-2 checkpoint")


class VisionEncoder(nn.Module):
    """`Blip2VisionModel`; its `post_layernorm` is BLIP-2's `ln_vision`. forward: pixels -> [B, P, Dv].

    Unless `trainable`, the trunk (everything but ln_vision) has requires_grad False, stays in eval
    mode and runs without autograd, so it stores no activations, in the dtype of its weights.
    """

    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.config = config.resolved()
        self.model = Blip2VisionModel(self.config.to_hf())
        self.ln_vision.eps = self.config.ln_vision_eps
        self.model.requires_grad_(self.config.trainable)
        self.ln_vision.requires_grad_(self.config.trainable or self.config.train_ln_vision)
        self.train()

    @classmethod
    def from_config(cls, config: VisionEncoderConfig) -> Self:
        """Build the encoder and load the `pretrained` ViT weights when the config names them."""
        encoder = cls(config)
        if config.pretrained is not None:
            encoder.load_pretrained(config.pretrained)
        return encoder

    def load_pretrained(self, path: str) -> None:
        _, prefix = _checkpoint_vision_config(path)
        state = sub_state_dict(load_state_dict(path, prefix), prefix)
        load_into(self.model, state, source=f"vision.pretrained {path}")

    @property
    def ln_vision(self) -> nn.LayerNorm:
        return self.model.post_layernorm

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        if not self.config.trainable:
            self.model.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.trainable:
            hidden = self._trunk(pixel_values)
        else:
            # A frozen trunk runs in the dtype its weights are held in, outside autocast: with bf16 weights
            # that is the same arithmetic as autocast, minus its fp32 LayerNorm outputs and per-op casts.
            dtype = self.model.embeddings.patch_embedding.weight.dtype
            with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
                hidden = self._trunk(pixel_values.to(dtype))
            hidden = hidden.to(self.ln_vision.weight.dtype)  # ln_vision may be trained (fp32) on a bf16 trunk
        return self.ln_vision(hidden)

    def _trunk(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embeddings(pixel_values)
        return self.model.encoder(inputs_embeds=hidden).last_hidden_state
