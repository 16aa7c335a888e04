"""The SEED image tokenizer: image -> 32 causal codes in [0, 8192) -> generation embeddings for SD."""

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Self

import torch
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn

from seed_lightning.core.config import dataclass_from_dict
from seed_lightning.core.data.transforms import CLIP_MEAN, CLIP_STD, image_to_tensor
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.io import write_json_atomic
from seed_lightning.core.modes import eval_mode
from seed_lightning.core.pretrained import WEIGHTS_FILE, load_into
from seed_lightning.tokenizer.causal_qformer import CausalQFormer, CausalQFormerConfig
from seed_lightning.tokenizer.heads import (
    GenerationHead,
    GenerationHeadConfig,
    ReconstructionHead,
    ReconstructionHeadConfig,
)
from seed_lightning.tokenizer.quantizer import QuantizerOutput, VectorQuantizer
from seed_lightning.tokenizer.vision import VisionEncoder, VisionEncoderConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
FORMAT = "seed_lightning.SeedTokenizer"


@dataclass
class SeedTokenizerConfig:
    """Architecture of the tokenizer and the pretrained parts it starts from."""

    vision: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    """The frozen ViT (+ ln_vision)."""
    qformer: CausalQFormerConfig = field(default_factory=CausalQFormerConfig)
    """The Causal Q-Former (+ its text branch and ITC projections)."""
    num_codes: int = 8192
    """Codebook size = number of visual tokens."""
    code_dim: int = 32
    """Width of a codebook entry."""
    beta: float = 0.25
    """Weight of the codebook term in the quantiser loss."""
    recon_head: ReconstructionHeadConfig = field(default_factory=ReconstructionHeadConfig)
    """Head reconstructing the causal embeddings from the decoded codes (training only)."""
    gen_head: GenerationHeadConfig = field(default_factory=GenerationHeadConfig)
    """Head turning the decoded codes into generation embeddings (out_dim = SD text hidden size)."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean used to normalise pixels (CLIP's)."""
    image_std: tuple[float, float, float] = CLIP_STD
    """Per-channel std used to normalise pixels (CLIP's)."""

    def resolved(self) -> "SeedTokenizerConfig":
        """This config with the dims of the pretrained checkpoints it names filled in."""
        return dataclasses.replace(self, vision=self.vision.resolved(), qformer=self.qformer.resolved())

    def standalone(self) -> "SeedTokenizerConfig":
        """This config without pretrained paths: what a saved tokenizer needs to be rebuilt. Call it on a
        resolved config (as `SeedTokenizer.config` is), else the dims of the pretrained parts are lost."""
        return dataclasses.replace(
            self,
            vision=dataclasses.replace(self.vision, pretrained=None),
            qformer=dataclasses.replace(self.qformer, pretrained=None),
        )

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        return dataclass_from_dict(cls, data, where="config")


_SEED_V1_FILES = "causal_qformer.pth (stage 1) and seed_tokenizer.pth (stage 2)"
# Official LAVIS-style SEED checkpoints (causal_qformer.pth, seed_tokenizer.pth) -> this module.
# Top-level renames first, then the BERT / timm-ViT sub-module renames inside them.
_SEED_PREFIXES = [
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"qformer.embeddings.\1_embeddings."),
    (r"^Qformer\.bert\.encoder\.", "qformer.qformer.encoder."),
    (r"^query_tokens$", "qformer.query_tokens"),
    (r"^vision_proj\.", "qformer.image_proj."),
    (r"^text_proj\.", "qformer.text_proj."),
    (r"^ln_vision\.", "vision.model.post_layernorm."),
    (r"^(encode|decode)_task_layer\.", r"\1_task_layer."),
    (r"^quantize\.embedding\.", "quantizer.embedding."),
    (r"^pos_embed$", "recon_head.pos_embed"),
    (r"^blocks\.", "recon_head.blocks."),
    (r"^pos_embed_text$", "gen_head.blocks.pos_embed"),
    (r"^blocks_text\.", "gen_head.blocks.blocks."),
    (r"^Reverse_Qformer\.bert\.embeddings\.LayerNorm\.", "gen_head.reverse_qformer.layernorm."),
    (r"^Reverse_Qformer\.bert\.encoder\.", "gen_head.reverse_qformer.encoder."),
    (r"^reverse_tokens$", "gen_head.reverse_queries"),
    (r"^distill_text_proj\.", "gen_head.proj."),
]
_SEED_SUBMODULES = [
    (r"\.(attention|crossattention)\.self\.", r".\1.attention."),
    (r"\.norm([12])\.", r".layer_norm\1."),
    (r"\.attn\.qkv\.", ".self_attn.qkv."),
    (r"\.attn\.proj\.", ".self_attn.projection."),
]
# Parts an official tokenizer checkpoint may lack: the EVA ViT trunk (take it from a BLIP-2 checkpoint
# via config.vision.pretrained) and the stage-1-only text branch and ITC projections.
_SEED_OPTIONAL = re.compile(
    r"^(vision\.model\.(?!post_layernorm)|qformer\.(embeddings|image_proj|text_proj)\.|"
    r"qformer\.qformer\.encoder\.layer\.\d+\.(intermediate|output)\.)"
)


def seed_checkpoint_key(name: str) -> str | None:
    """This module's name for a tensor of an official SEED checkpoint; None for tensors it has no use
    for (EVA ViT, ITM head, temperature, v2 image heads, ...)."""
    for pattern, replacement in _SEED_PREFIXES:
        if re.match(pattern, name):
            name = re.sub(pattern, replacement, name)
            for sub_pattern, sub_replacement in _SEED_SUBMODULES:
                name = re.sub(sub_pattern, sub_replacement, name)
            return name
    return None


class SeedTokenizer(nn.Module):
    """ViT -> Causal Q-Former -> encode_task_layer -> codebook -> decode_task_layer -> heads.

    The constructor builds the architecture with random weights (dims of pretrained parts are read
    from their config.json); `from_config` also loads the pretrained weights; `load` rebuilds a saved one.
    """

    def __init__(self, config: SeedTokenizerConfig):
        super().__init__()
        self.config = config.resolved()
        self.vision = VisionEncoder(self.config.vision)
        self.qformer = CausalQFormer(self.config.qformer, vision_width=self.vision.hidden_size)
        width, num_queries, code_dim = self.qformer.hidden_size, self.config.qformer.num_queries, self.config.code_dim
        self.encode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, code_dim))
        self.quantizer = VectorQuantizer(self.config.num_codes, code_dim, self.config.beta)
        self.decode_task_layer = nn.Sequential(nn.Linear(code_dim, code_dim), nn.Tanh(), nn.Linear(code_dim, width))
        self.recon_head = ReconstructionHead(self.config.recon_head, width, num_queries)
        self.gen_head = GenerationHead(self.config.gen_head, width, num_queries)

    @classmethod
    def from_config(cls, config: SeedTokenizerConfig) -> Self:
        """Build the tokenizer and load the pretrained ViT / Q-Former the config names."""
        tokenizer = cls(config)
        if config.vision.pretrained is not None:
            tokenizer.vision.load_pretrained(config.vision.pretrained)
        if config.qformer.pretrained is not None:
            tokenizer.qformer.load_pretrained(config.qformer.pretrained)
        return tokenizer

    @classmethod
    def from_seed_checkpoint(
        cls, paths: str | os.PathLike | list[str | os.PathLike], config: SeedTokenizerConfig | None = None
    ) -> Self:
        """A tokenizer holding the official SEED v1 weights, in eval mode.

        `paths`: LAVIS .pth state dicts, applied in order. SEED v1 needs both of its files,
        `[causal_qformer.pth, seed_tokenizer.pth]`: stage 1's Causal Q-Former (with ln_vision), then stage 2's
        codebook and heads. `config` gives the architecture (default: the full-size v1 one); its
        `vision.pretrained` should name a BLIP-2 checkpoint, whose EVA ViT-g the official files do not contain.
        """
        config = config or SeedTokenizerConfig()
        tokenizer = cls.from_config(config)
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        state: dict[str, torch.Tensor] = {}
        ignored: list[str] = []
        for path in paths:
            if not os.path.isfile(path):
                raise ConfigError(f"SEED checkpoint {path} does not exist; download both official v1 files and pass "
                                  f"them in this order: {_SEED_V1_FILES}")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            for name, tensor in checkpoint.get("model", checkpoint).items():
                target = seed_checkpoint_key(name)
                if target is None:
                    ignored.append(name)
                else:
                    state[target] = tensor
        source = f"SEED checkpoint {', '.join(map(str, paths))}"
        vit_pretrained = config.vision.pretrained
        from_vit_pretrained = [
            name for name in tokenizer.state_dict()
            if vit_pretrained is not None and name.startswith("vision.model.") and name not in state
        ]
        kept = f"; {len(from_vit_pretrained)} ViT tensors kept from vision.pretrained {vit_pretrained}"
        log.info(
            "%s: %d tensors loaded, %d not used (%s...)%s", source, len(state), len(ignored), ", ".join(ignored[:5]),
            kept if from_vit_pretrained else "",
        )
        load_into(
            tokenizer,
            state,
            source=source,
            may_be_missing=lambda name: _SEED_OPTIONAL.match(name) is not None,
            loaded_before=set(from_vit_pretrained).__contains__,
            hint=f"pass both official v1 files, in this order: {_SEED_V1_FILES}",
        )
        return tokenizer.eval()

    # ---- image -> codes -----------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def num_queries(self) -> int:
        return self.config.qformer.num_queries

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images (any mode) -> normalised pixels [B, 3, S, S] (CPU, fp32), exactly the official SEED / BLIP-2
        inference input: PIL's `convert("RGB")`, bicubic resize to S x S, mean/std. The images are not changed
        (the training loaders' faster, slightly different decoding is in `seed_lightning.core.data.transforms`)."""
        mean = torch.tensor(self.config.image_mean).view(3, 1, 1)
        std = torch.tensor(self.config.image_std).view(3, 1, 1)
        size = (self.image_size, self.image_size)
        return torch.stack(
            [image_to_tensor(image.convert("RGB").resize(size, Image.Resampling.BICUBIC), mean, std) for image in images]
        )

    def causal_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] -> causal embeddings [B, Q, D]."""
        return self.qformer(self.vision(pixel_values))

    def quantize(self, causal_embeds: torch.Tensor) -> QuantizerOutput:
        """Causal embeddings [B, Q, D] -> codebook input z [B, Q, code_dim] -> nearest codes, z_q, VQ loss."""
        return self.quantizer(self.encode_task_layer(causal_embeds))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] -> codes LongTensor [B, Q] in [0, num_codes). Runs without dropout whatever the
        module's train/eval mode (which it leaves as it was), so the same image always gets the same codes."""
        with eval_mode(self):
            return self.quantizer.nearest_codes(self.encode_task_layer(self.causal_embeddings(pixel_values)))

    # ---- codes -> embeddings ------------------------------------------------------------------
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, Q] -> decoded embeddings [B, Q, D] (the input of both heads)."""
        return self.decode_task_layer(self.quantizer.lookup(codes))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, Q] -> generation embeddings [B, num_queries of the head, out_dim] (SD prompt_embeds); like
        `encode`, without dropout whatever the module's mode."""
        with eval_mode(self):
            return self.gen_head(self.embed_codes(codes))

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write model.safetensors + config.json (resolved dims, no pretrained paths, no Lightning state)."""
        os.makedirs(directory, exist_ok=True)
        save_model(self, os.path.join(directory, WEIGHTS_FILE))
        record = {"format": FORMAT, "config": dataclasses.asdict(self.config.standalone())}
        write_json_atomic(os.path.join(directory, CONFIG_FILE), record, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Self:
        """Rebuild a tokenizer written by `save`, in eval mode; needs none of the original pretrained folders."""
        config_path = os.path.join(directory, CONFIG_FILE)
        weights_path = os.path.join(directory, WEIGHTS_FILE)
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            raise ConfigError(f"{directory} is not a saved SeedTokenizer (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        with open(config_path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ConfigError(f"{config_path} was not written by SeedTokenizer.save; point at an exported tokenizer")
        tokenizer = cls(SeedTokenizerConfig.from_dict(saved["config"]))
        load_model(tokenizer, weights_path, strict=True)
        return tokenizer.to(map_location).eval()
