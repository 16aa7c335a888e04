"""The Causal Q-Former: BLIP-2's Q-Former whose learned queries attend only to earlier queries."""

import dataclasses
import re
from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2Config, Blip2QFormerConfig, Blip2QFormerModel
from transformers.masking_utils import causal_mask_function, create_bidirectional_mask
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.pretrained import load_hf_config, load_into, load_state_dict

BERT_INIT_STD = 0.02  # BERT's initializer range; also the spec's query init N(0, 0.02)

# BLIP-2 checkpoint tensor prefix -> this module's attribute.
_CHECKPOINT_PARTS = {
    "query_tokens": "query_tokens",
    "qformer.": "qformer.",
    "embeddings.": "embeddings.",
    "vision_projection.": "image_proj.",
    "text_projection.": "text_proj.",
}
# Only these may be absent from a checkpoint: the text branch (Blip2ForConditionalGeneration has no
# text embeddings nor text FFN) and the ITC projections.
_OPTIONAL = re.compile(r"^(embeddings|image_proj|text_proj|qformer\.encoder\.layer\.\d+\.(intermediate|output))\.")


@dataclass
class CausalQFormerConfig:
    """The Q-Former: from a BLIP-2 checkpoint when `pretrained` is set, otherwise random with the dims below."""

    pretrained: str | None = None
    """BLIP-2 checkpoint (folder/hub id): Q-Former, queries, text embeddings + ITC projections if present; dims win."""
    hidden_size: int = 768
    """Width of the Q-Former (BERT-base: 768)."""
    num_layers: int = 12
    """Number of BERT layers."""
    num_heads: int = 12
    """Attention heads per layer."""
    intermediate_size: int = 3072
    """Hidden width of the feed-forward blocks."""
    cross_attention_frequency: int = 2
    """A cross-attention to the ViT every this many layers (starting at layer 0)."""
    vocab_size: int = 30523
    """Text vocabulary size (bert-base-uncased + BLIP-2's [DEC] token)."""
    max_text_positions: int = 512
    """Maximum text length of the text branch."""
    num_queries: int = 32
    """Number of learned queries, i.e. causal embeddings (and codes) per image."""
    embed_dim: int = 256
    """Width of the ITC image/text projections."""
    causal: bool = True
    """Lower-triangular query self-attention (SEED); False gives BLIP-2's bidirectional queries."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"qformer: hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )

    def resolved(self) -> "CausalQFormerConfig":
        """This config with the dims of the `pretrained` checkpoint filled in (unchanged when None)."""
        if self.pretrained is None:
            return self
        blip2 = _checkpoint_config(self.pretrained)
        q = blip2.qformer_config
        return dataclasses.replace(
            self,
            hidden_size=q.hidden_size,
            num_layers=q.num_hidden_layers,
            num_heads=q.num_attention_heads,
            intermediate_size=q.intermediate_size,
            cross_attention_frequency=q.cross_attention_frequency,
            vocab_size=q.vocab_size,
            max_text_positions=q.max_position_embeddings,
            num_queries=blip2.num_query_tokens,
            embed_dim=blip2.image_text_hidden_size,
        )

    def to_hf(self, vision_width: int) -> Blip2QFormerConfig:
        return Blip2QFormerConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_text_positions,
            cross_attention_frequency=self.cross_attention_frequency,
            encoder_hidden_size=vision_width,
            use_qformer_text_input=True,  # builds the text FFN of the ITC text branch
            initializer_range=BERT_INIT_STD,
            attn_implementation="sdpa",
        )


def _checkpoint_config(path: str) -> Blip2Config:
    hf_config = load_hf_config(path)
    if not isinstance(hf_config, Blip2Config):
        raise ConfigError(f"qformer.pretrained: {path} is a {type(hf_config).__name__}, not a BLIP-2 checkpoint")
    return hf_config


class CausalQFormer(nn.Module):
    """Learned queries -> `Blip2QFormerModel` (cross-attending to the ViT) -> causal embeddings [B, Q, D],
    plus the BERT text branch sharing its self-attention layers and the ITC projections."""

    def __init__(self, config: CausalQFormerConfig, vision_width: int):
        super().__init__()
        self.config = config.resolved()
        hf_config = self.config.to_hf(vision_width)
        self.query_tokens = nn.Parameter(torch.empty(1, self.config.num_queries, self.config.hidden_size))
        self.qformer = Blip2QFormerModel(hf_config)
        self.embeddings = Blip2TextEmbeddings(hf_config)
        self.image_proj = nn.Linear(self.config.hidden_size, self.config.embed_dim)
        self.text_proj = nn.Linear(self.config.hidden_size, self.config.embed_dim)
        nn.init.normal_(self.query_tokens, std=BERT_INIT_STD)
        for table in (self.embeddings.word_embeddings, self.embeddings.position_embeddings):
            nn.init.normal_(table.weight, std=BERT_INIT_STD)

    @classmethod
    def from_config(cls, config: CausalQFormerConfig, vision_width: int) -> Self:
        """Build the Q-Former and load the `pretrained` BLIP-2 weights when the config names them."""
        qformer = cls(config, vision_width)
        if config.pretrained is not None:
            qformer.load_pretrained(config.pretrained)
        return qformer

    def load_pretrained(self, path: str) -> None:
        checkpoint_width = _checkpoint_config(path).qformer_config.encoder_hidden_size
        if checkpoint_width != self.qformer.config.encoder_hidden_size:
            raise ConfigError(
                f"qformer.pretrained: {path} cross-attends to {checkpoint_width}-d image tokens but the vision "
                f"encoder gives {self.qformer.config.encoder_hidden_size}; use the ViT of the same checkpoint"
            )
        state = {}
        for name, tensor in load_state_dict(path, tuple(_CHECKPOINT_PARTS)).items():
            source_prefix = next(p for p in _CHECKPOINT_PARTS if name.startswith(p))
            state[_CHECKPOINT_PARTS[source_prefix] + name.removeprefix(source_prefix)] = tensor
        load_into(
            self,
            state,
            source=f"qformer.pretrained {path}",
            may_be_missing=lambda name: _OPTIONAL.match(name) is not None,
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, image_embeds: torch.Tensor, image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens [B, P, Dv] (+ optional padding mask [B, P]) -> causal embeddings [B, Q, D]."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_mask = None
        if self.config.causal:
            # A prepared 4D mask is passed through by the Q-Former unchanged: query i sees queries <= i.
            query_mask = create_bidirectional_mask(
                config=self.qformer.config,
                inputs_embeds=queries,
                attention_mask=None,
                and_mask_function=causal_mask_function,
            )
        return self.qformer(
            query_embeds=queries,
            attention_mask=query_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_attention_mask,
        ).last_hidden_state

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """BERT tokens [B, T] (+ padding mask) -> text hidden states [B, T, D] (bidirectional, no image)."""
        text_embeds = self.embeddings(input_ids=input_ids)
        return self.qformer(query_embeds=text_embeds, query_length=0, attention_mask=attention_mask).last_hidden_state

    def image_features(self, causal_embeds: torch.Tensor) -> torch.Tensor:
        """l2-normalised ITC image feature [B, E] from the LAST causal query (it has seen all queries)."""
        return F.normalize(self.image_proj(causal_embeds[:, -1]), dim=-1)

    def text_features(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """l2-normalised ITC text feature [B, E] from the [CLS] token."""
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)
