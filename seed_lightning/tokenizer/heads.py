"""Heads on the decoded codes: reconstruction of the causal embeddings (training only) and the
generation head (ViT blocks + Reverse Q-Former) producing Stable Diffusion conditioning."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer

from seed_lightning.core.errors import ConfigError
from seed_lightning.tokenizer.causal_qformer import BERT_INIT_STD


@dataclass
class ViTBlocksConfig:
    """Learned position embedding + pre-norm ViT blocks; width and token count follow the Q-Former."""

    depth: int = 4
    """Number of ViT blocks."""
    num_heads: int = 12
    """Attention heads per block."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the width."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon of the blocks."""


@dataclass
class ReconstructionHeadConfig(ViTBlocksConfig):
    """Predicts the causal embeddings from the decoded codes: ViT blocks only."""


@dataclass
class GenerationHeadConfig(ViTBlocksConfig):
    """ViT blocks, then a Reverse Q-Former whose learned queries cross-attend to the blocks' output."""

    qformer_layers: int = 4
    """BERT layers of the Reverse Q-Former."""
    cross_attention_frequency: int = 2
    """A cross-attention every this many Reverse Q-Former layers, from layer 0 (4 layers: 0 and 2)."""
    num_queries: int = 77
    """Learned bidirectional queries = output tokens (SD v1 text conditioning: 77; unCLIP v2: 1)."""
    out_dim: int = 768
    """Output width (SD v1 CLIP-L/14 text hidden size: 768; unCLIP image embedding: 1024)."""


class ViTBlocks(nn.Module):
    """x [B, N, D] + learned position embedding -> `depth` pre-norm ViT blocks (qkv bias, GELU MLP)."""

    def __init__(self, config: ViTBlocksConfig, dim: int, num_tokens: int):
        super().__init__()
        if dim % config.num_heads:
            raise ConfigError(f"head num_heads ({config.num_heads}) must divide the Q-Former width ({dim})")
        block_config = Blip2VisionConfig(
            hidden_size=dim,
            num_attention_heads=config.num_heads,
            intermediate_size=int(dim * config.mlp_ratio),
            layer_norm_eps=config.layer_norm_eps,
            qkv_bias=True,
            hidden_act="gelu",
            attn_implementation="sdpa",
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))  # zero init, as in the reference
        self.blocks = nn.ModuleList(Blip2EncoderLayer(block_config) for _ in range(config.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


class ReconstructionHead(ViTBlocks):
    """Decoded codes [B, Q, D] -> predicted causal embeddings [B, Q, D]."""


class GenerationHead(nn.Module):
    """Decoded codes [B, Q, D] -> generation embeddings [B, num_queries, out_dim]."""

    def __init__(self, config: GenerationHeadConfig, dim: int, num_tokens: int):
        super().__init__()
        self.blocks = ViTBlocks(config, dim, num_tokens)
        self.reverse_queries = nn.Parameter(torch.empty(1, config.num_queries, dim))
        nn.init.normal_(self.reverse_queries, std=BERT_INIT_STD)
        self.reverse_qformer = Blip2QFormerModel(
            Blip2QFormerConfig(
                hidden_size=dim,
                num_hidden_layers=config.qformer_layers,
                num_attention_heads=config.num_heads,
                intermediate_size=int(dim * config.mlp_ratio),
                cross_attention_frequency=config.cross_attention_frequency,
                encoder_hidden_size=dim,
                initializer_range=BERT_INIT_STD,
                attn_implementation="sdpa",
            )
        )
        self.proj = nn.Linear(dim, config.out_dim)

    def forward(self, decoded: torch.Tensor) -> torch.Tensor:
        memory = self.blocks(decoded)
        queries = self.reverse_queries.expand(decoded.shape[0], -1, -1)
        hidden = self.reverse_qformer(query_embeds=queries, encoder_hidden_states=memory).last_hidden_state
        return self.proj(hidden)
