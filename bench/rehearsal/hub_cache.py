"""Random checkpoints in the exact Hugging Face hub layouts of every model the paper configs name.

    python -m bench.rehearsal.hub_cache --cache DIR [--scale full|tiny] [--device cuda] [--check]

writes an HF hub cache (``models--ORG--NAME/refs/main`` holding a commit hash, files under
``snapshots/<hash>/``), so that with ``HF_HUB_OFFLINE=1 HF_HUB_CACHE=DIR`` the configs' hub ids resolve
with no path overridden:

- ``Salesforce/blip2-opt-2.7b``: Blip2ForConditionalGeneration (ViT-g/14, BERT-base Q-Former, OPT-2.7b with
  BLIP-2's ``<image>`` token), fp32 in 2 safetensors shards + index, OPT tokenizer files with ``<image>``,
  preprocessor_config.json and processor_config.json;
- ``bert-base-uncased``: BertForMaskedLM, vocab.txt (30522), tokenizer.json, tokenizer_config.json;
- ``CompVis/stable-diffusion-v1-4``: the diffusers layout (model_index.json, unet/, vae/, text_encoder/ = CLIP
  ViT-L/14 text, tokenizer/ = CLIP BPE without tokenizer.json, scheduler/ = PNDM, feature_extractor/,
  safety_checker/), fp32;
- ``facebook/opt-2.7b``: OPTForCausalLM in fp16 (safetensors; the hub repo ships pytorch_model.bin), GPT-2 BPE
  files (50265 entries), special_tokens_map.json, tokenizer_config.json;
- ``openai/clip-vit-large-patch14``: CLIPModel fp32, CLIP tokenizer files + preprocessor_config.json.

Configs carry the real values (the library's config classes with the hub repos' settings); weights are
random (from a fixed seed), created on `device` and written with save_pretrained, so the files are the ones
the libraries write. ``--scale tiny`` builds the same repos, files and names with tiny widths and depths (the
vocabularies, image sizes and the 768-wide SD text encoder the configs depend on stay real), for CPU tests.
A model already built at the requested scale is kept (``--force`` rebuilds).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.rehearsal import vocab
from devkit.tiny_models import _build_once

BLIP2 = "Salesforce/blip2-opt-2.7b"
BERT = "bert-base-uncased"
SD = "CompVis/stable-diffusion-v1-4"
OPT = "facebook/opt-2.7b"
CLIP = "openai/clip-vit-large-patch14"
HUB_IDS = (BLIP2, BERT, SD, OPT, CLIP)
SCALE_FILE = "rehearsal-scale.json"
"""Written into each repo folder: the scale its snapshot was built at."""
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Dims:
    """Widths and depths of one scale; everything not here (vocabularies, image sizes, token counts) is real."""

    vit: tuple[int, int, int, int]
    """BLIP-2 ViT: hidden, layers, heads, MLP (ViT-g/14: 1408, 39, 16, 6144)."""
    qformer: tuple[int, int, int, int]
    """Q-Former: hidden, layers, heads, FFN (BERT-base: 768, 12, 12, 3072)."""
    opt: tuple[int, int, int, int]
    """OPT: hidden, layers, heads, FFN (OPT-2.7b: 2560, 32, 32, 10240)."""
    bert: tuple[int, int, int, int]
    """bert-base-uncased: hidden, layers, heads, FFN."""
    sd_text: tuple[int, int, int, int]
    """SD v1 text encoder (CLIP ViT-L/14 text): hidden (768 at both scales: the configs' gen_head.out_dim), layers, heads, MLP."""
    clip_text: tuple[int, int, int, int]
    """openai/clip-vit-large-patch14 text tower: hidden, layers, heads, MLP."""
    clip_vision: tuple[int, int, int, int]
    """CLIP ViT-L/14 vision tower (the scorer's and the safety checker's): hidden, layers, heads, MLP."""
    clip_projection: int
    """CLIP joint embedding size."""
    unet_channels: tuple[int, ...]
    """UNet block widths; every block but the last cross-attends (SD v1: 320, 640, 1280, 1280)."""
    unet_layers: int
    """UNet layers per block."""
    vae_channels: tuple[int, ...]
    """VAE block widths (SD v1: 128, 256, 512, 512)."""
    vae_layers: int
    """VAE layers per block."""
    sd_image_size: int
    """Pixels of the images the pipeline renders by default (SD v1: 512)."""


FULL = Dims(
    vit=(1408, 39, 16, 6144), qformer=(768, 12, 12, 3072), opt=(2560, 32, 32, 10240), bert=(768, 12, 12, 3072),
    sd_text=(768, 12, 12, 3072), clip_text=(768, 12, 12, 3072), clip_vision=(1024, 24, 16, 4096),
    clip_projection=768, unet_channels=(320, 640, 1280, 1280), unet_layers=2, vae_channels=(128, 256, 512, 512),
    vae_layers=2, sd_image_size=512,
)
TINY = Dims(
    vit=(64, 2, 4, 128), qformer=(96, 2, 4, 192), opt=(64, 2, 4, 128), bert=(32, 1, 2, 64),
    sd_text=(768, 1, 12, 128), clip_text=(32, 1, 2, 64), clip_vision=(32, 1, 2, 64), clip_projection=32,
    unet_channels=(32, 64), unet_layers=1, vae_channels=(32, 64), vae_layers=1, sd_image_size=32,
)
SCALES = {"full": FULL, "tiny": TINY}

OPT_VOCAB = 50272  # facebook/opt-2.7b's embedding rows (the 50265-entry vocabulary padded)
BLIP2_TEXT_VOCAB = 50304  # the hub BLIP-2 OPT's rows since <image> was added
BLIP2_IMAGE_TOKEN_INDEX = vocab.OPT_VOCAB_SIZE
BLIP2_OPT_EOS = 50118  # as in the hub config's text_config ("\n")


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def commit_hash(repo_id: str) -> str:
    """A fixed 40-hex 'commit' per repo (the real commit hashes are unknown offline)."""
    return hashlib.sha1(f"seed-lightning-rehearsal/{repo_id}".encode()).hexdigest()


def snapshot(cache: Path, repo_id: str) -> Path:
    """The folder the hub id resolves to once built."""
    return repo_folder(cache, repo_id) / "snapshots" / commit_hash(repo_id)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _opt_config(dims: tuple[int, int, int, int], vocab_size: int, eos_token_id: int, **extra) -> dict:
    hidden, layers, heads, ffn = dims
    return dict(
        model_type="opt", vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
        num_attention_heads=heads, max_position_embeddings=2048, word_embed_proj_dim=hidden, do_layer_norm_before=True,
        activation_function="relu", dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, init_std=0.02,
        bos_token_id=2, eos_token_id=eos_token_id, pad_token_id=1, **extra,
    )


def _clip_text_config(dims: tuple[int, int, int, int], projection_dim: int) -> dict:
    hidden, layers, heads, mlp = dims
    # bos 0 / eos 2 / pad 1 as in the hub configs (eos 2 selects transformers' legacy argmax pooling, like the hub).
    return dict(
        vocab_size=vocab.CLIP_VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=mlp, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=projection_dim,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def _clip_vision_config(dims: tuple[int, int, int, int], projection_dim: int) -> dict:
    hidden, layers, heads, mlp = dims
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
        image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=projection_dim,
    )


def _save(model, folder: Path, dtype: torch.dtype, **kwargs) -> None:
    model.to(dtype).save_pretrained(folder, **kwargs)


def build_blip2(folder: Path, dims: Dims, lines: list[str], device: str) -> None:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessor

    vit_hidden, vit_layers, vit_heads, vit_mlp = dims.vit
    q_hidden, q_layers, q_heads, q_ffn = dims.qformer
    config = Blip2Config(
        vision_config=dict(
            hidden_size=vit_hidden, num_hidden_layers=vit_layers, num_attention_heads=vit_heads,
            intermediate_size=vit_mlp, image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True,
        ),
        qformer_config=dict(
            vocab_size=vocab.BERT_VOCAB_SIZE, hidden_size=q_hidden, num_hidden_layers=q_layers,
            num_attention_heads=q_heads, intermediate_size=q_ffn, cross_attention_frequency=2,
            encoder_hidden_size=vit_hidden, max_position_embeddings=512, pad_token_id=0,
        ),
        text_config=_opt_config(dims.opt, BLIP2_TEXT_VOCAB, BLIP2_OPT_EOS, architectures=["OPTForCausalLM"]),
        num_query_tokens=32, image_text_hidden_size=256, image_token_index=BLIP2_IMAGE_TOKEN_INDEX,
        architectures=["Blip2ForConditionalGeneration"],
    )
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config)
        # transformers initialises the ViT with std 1e-10 (its config default): a random tower would then map
        # every image to the same tokens. Re-draw its weights as the tiny models do (the config stays the hub's).
        with torch.no_grad():
            for module in model.vision_model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    module.weight.normal_(0.0, 0.02)
            model.query_tokens.normal_(0.0, 0.02)
    total = sum(p.numel() * 4 for p in model.parameters())
    # Two shards, as the hub repo has (model-00001-of-00002.safetensors + model.safetensors.index.json).
    _save(model, folder, torch.float32, max_shard_size=total // 2 + (1 << 20))
    del model
    vocab.write_opt_tokenizer(folder, lines, image_token=True)
    BlipImageProcessor(
        size={"height": 224, "width": 224}, resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    ).save_pretrained(folder)
    _write_json(folder / "processor_config.json", {"num_query_tokens": 32, "processor_class": "Blip2Processor"})


def build_bert(folder: Path, dims: Dims, lines: list[str], device: str) -> None:
    from transformers import BertConfig, BertForMaskedLM

    hidden, layers, heads, ffn = dims.bert
    config = BertConfig(
        vocab_size=vocab.BERT_VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
        architectures=["BertForMaskedLM"],
    )
    with torch.device(device):
        _save(BertForMaskedLM(config), folder, torch.float32)
    vocab.write_bert_tokenizer(folder, lines)


def build_opt(folder: Path, dims: Dims, lines: list[str], device: str) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**{k: v for k, v in _opt_config(dims.opt, OPT_VOCAB, 2).items() if k != "model_type"},
                       architectures=["OPTForCausalLM"])
    with torch.device(device):
        _save(OPTForCausalLM(config), folder, torch.float16)  # the hub ships OPT-2.7b in fp16
    vocab.write_opt_tokenizer(folder, lines)


def build_clip(folder: Path, dims: Dims, lines: list[str], device: str) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config=_clip_text_config(dims.clip_text, dims.clip_projection),
        vision_config=_clip_vision_config(dims.clip_vision, dims.clip_projection),
        projection_dim=dims.clip_projection, architectures=["CLIPModel"],
    )
    with torch.device(device):
        _save(CLIPModel(config), folder, torch.float32)
    vocab.write_clip_tokenizer(folder, lines, with_tokenizer_json=True)
    CLIPImageProcessor(image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder)


def sd_text_encoder(dims: Dims):
    """SD v1's text encoder (at FULL: CLIP ViT-L/14's text tower, 768 wide, 12 layers, 77 tokens), random weights,
    built on the current default device."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**_clip_text_config(dims.sd_text, dims.sd_text[0])))


def build_sd(folder: Path, dims: Dims, lines: list[str], device: str) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTokenizer

    vae_scale = 2 ** (len(dims.vae_channels) - 1)
    cross_attention = len(dims.unet_channels) - 1
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=dims.sd_image_size // vae_scale, in_channels=4, out_channels=4,
            block_out_channels=dims.unet_channels, layers_per_block=dims.unet_layers,
            down_block_types=("CrossAttnDownBlock2D",) * cross_attention + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * cross_attention,
            cross_attention_dim=dims.sd_text[0], attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=dims.vae_channels,
            layers_per_block=dims.vae_layers, sample_size=dims.sd_image_size,
            down_block_types=("DownEncoderBlock2D",) * len(dims.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(dims.vae_channels),
        )
        text_encoder = sd_text_encoder(dims)
        # The project never loads the safety checker; it is built because it is cheap and the layout has it.
        safety_checker = StableDiffusionSafetyChecker(CLIPConfig(
            text_config=_clip_text_config(dims.clip_text, dims.clip_projection),
            vision_config=_clip_vision_config(dims.clip_vision, dims.clip_projection),
            projection_dim=dims.clip_projection,
        ))
    scheduler = PNDMScheduler(  # CompVis/stable-diffusion-v1-4's scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )
    vocab_size, merges = vocab.clip_vocab(lines)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer(vocab=vocab_size, merges=merges), unet=unet,
        scheduler=scheduler, safety_checker=safety_checker,
        feature_extractor=CLIPImageProcessor(image_mean=CLIP_MEAN, image_std=CLIP_STD), requires_safety_checker=True,
    )
    pipeline.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    del pipeline, unet, vae, text_encoder, safety_checker
    # Without torchvision transformers 5 hands diffusers its PIL fallback class; the hub names the plain one.
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    _write_json(folder / "model_index.json", index)
    tokenizer_dir = folder / "tokenizer"  # the hub's files instead of transformers 5's layout
    shutil.rmtree(tokenizer_dir)
    tokenizer_dir.mkdir()
    vocab.write_clip_tokenizer(tokenizer_dir, lines, with_tokenizer_json=False)


BUILDERS: dict[str, Callable[[Path, Dims, list[str], str], None]] = {
    BLIP2: build_blip2, BERT: build_bert, SD: build_sd, OPT: build_opt, CLIP: build_clip,
}


def built_scale(cache: Path, repo_id: str) -> str | None:
    """The scale `repo_id` was built at in `cache`, or None when it is absent or incomplete."""
    record = repo_folder(cache, repo_id) / SCALE_FILE
    if not record.is_file() or not snapshot(cache, repo_id).is_dir():
        return None
    return json.loads(record.read_text())["scale"]


def build_cache(
    cache: str | Path, scale: str = "full", device: str | None = None, force: bool = False, seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Builds every repo of HUB_IDS into the HF cache folder `cache`; returns hub id -> snapshot folder."""
    cache = Path(cache)
    dims = SCALES[scale]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lines = vocab.corpus_lines()
    folders = {}
    for repo_id in HUB_IDS:
        rebuild = force or built_scale(cache, repo_id) != scale
        started = time.perf_counter()
        repo = repo_folder(cache, repo_id)
        (repo / "snapshots").mkdir(parents=True, exist_ok=True)
        commit = commit_hash(repo_id)
        folders[repo_id] = _build_once(
            repo / "snapshots", commit, lambda folder: BUILDERS[repo_id](folder, dims, lines, device), seed, rebuild
        )
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        _write_json(repo / SCALE_FILE, {"scale": scale, "dims": dataclasses.asdict(dims)})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = sum(f.stat().st_size for f in folders[repo_id].rglob("*") if f.is_file())
        what = "built" if rebuild else "kept"
        log(f"{repo_id}: {what} ({scale}, {size / 2**30:.2f} GiB, {time.perf_counter() - started:.0f} s)")
    return folders


def check_cache(scale: str = "full", load_weights: bool = True, device: str = "cpu") -> list[str]:
    """Resolves every hub id offline through the project's own loaders (HF_HUB_OFFLINE / HF_HUB_CACHE must be set
    before this process imports huggingface_hub) and checks the dims; returns one line per hub id.

    Without `load_weights` only configs, tokenizers, processors and the safetensors index are read (fast at
    full size: the rehearsal stages load the weights anyway)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    from seed_lightning.core.pretrained import WEIGHTS_INDEX_FILE, load_hf_config, resolve_file
    from seed_lightning.tokenizer.causal_qformer import CausalQFormer, CausalQFormerConfig
    from seed_lightning.tokenizer.vision import VisionEncoder, VisionEncoderConfig

    dims = SCALES[scale]
    lines = []

    def expect(what: str, got, wanted) -> None:
        if got != wanted:
            raise AssertionError(f"{what}: got {got!r}, expected {wanted!r}")

    vision_config = VisionEncoderConfig(pretrained=BLIP2).resolved()
    expect("BLIP-2 ViT (hidden, layers, heads, mlp)", (vision_config.hidden_size, vision_config.num_layers,
           vision_config.num_heads, vision_config.mlp_size), dims.vit)
    expect("BLIP-2 ViT image/patch", (vision_config.image_size, vision_config.patch_size), (224, 14))
    qformer_config = CausalQFormerConfig(pretrained=BLIP2).resolved()
    expect("Q-Former (hidden, layers, heads, ffn)", (qformer_config.hidden_size, qformer_config.num_layers,
           qformer_config.num_heads, qformer_config.intermediate_size), dims.qformer)
    expect("Q-Former queries / cross-attention frequency", (qformer_config.num_queries,
           qformer_config.cross_attention_frequency), (32, 2))
    blip2 = load_hf_config(BLIP2)
    expect("BLIP-2 text_config vocab", blip2.text_config.vocab_size, BLIP2_TEXT_VOCAB)
    if resolve_file(BLIP2, WEIGHTS_INDEX_FILE) is None:
        raise AssertionError(f"{BLIP2} has no {WEIGHTS_INDEX_FILE}")
    expect("BLIP-2 tokenizer size", len(AutoTokenizer.from_pretrained(BLIP2)), vocab.OPT_VOCAB_SIZE + 1)
    if load_weights:
        vision = VisionEncoder.from_config(VisionEncoderConfig(pretrained=BLIP2))
        CausalQFormer.from_config(CausalQFormerConfig(pretrained=BLIP2), vision.hidden_size)
    lines.append(f"{BLIP2}: ViT {dims.vit}, Q-Former {dims.qformer}" + (" (weights loaded)" if load_weights else ""))

    bert = AutoTokenizer.from_pretrained(BERT)
    expect("bert-base-uncased vocabulary", len(bert), vocab.BERT_VOCAB_SIZE)
    expect("bert special ids", [bert.pad_token_id, bert.unk_token_id, bert.cls_token_id, bert.sep_token_id,
                                bert.mask_token_id], [0, 100, 101, 102, 103])
    lines.append(f"{BERT}: {type(bert).__name__}, {len(bert)} tokens")

    sd_tokenizer = CLIPTokenizer.from_pretrained(SD, subfolder="tokenizer")
    expect("SD tokenizer size", len(sd_tokenizer), vocab.CLIP_VOCAB_SIZE)
    if load_weights:
        from seed_lightning.tokenizer.image_decoder import ImageDecoder
        from seed_lightning.tokenizer.sd_text_encoder import SDTextEncoder

        text_encoder = SDTextEncoder.from_pretrained(SD)
        expect("SD text encoder width", text_encoder.hidden_size, 768)
        embeddings = text_encoder(["two red circles"])
        decoder = ImageDecoder.from_pretrained(SD, num_inference_steps=2).to(device)
        image = decoder(embeddings.to(device))[0]
        expect("SD image size", image.size, (dims.sd_image_size, dims.sd_image_size))
    lines.append(f"{SD}: text encoder 768 wide, {len(sd_tokenizer)} tokens"
                 + (f", renders {dims.sd_image_size} px" if load_weights else ""))

    opt_tokenizer = AutoTokenizer.from_pretrained(OPT)
    expect("OPT tokenizer size", len(opt_tokenizer), vocab.OPT_VOCAB_SIZE)
    expect("OPT special tokens", [opt_tokenizer.bos_token, opt_tokenizer.eos_token, opt_tokenizer.pad_token_id],
           ["</s>", "</s>", 1])
    opt = load_hf_config(OPT)
    expect("OPT (hidden, layers, heads, ffn)", (opt.hidden_size, opt.num_hidden_layers, opt.num_attention_heads,
           opt.ffn_dim), dims.opt)
    expect("OPT vocab / positions", (opt.vocab_size, opt.max_position_embeddings), (OPT_VOCAB, 2048))
    if load_weights:
        from seed_lightning.mllm.model import MultimodalLM, MultimodalLMConfig

        mllm = MultimodalLM(MultimodalLMConfig(pretrained=OPT, lora=None))
        mllm.caption(torch.zeros(1, 32, dtype=torch.long), max_new_tokens=2)
    lines.append(f"{OPT}: OPT {dims.opt}, {len(opt_tokenizer)} tokens")

    if load_weights:
        from PIL import Image

        from seed_lightning.core.clip_score import CLIPScorer

        scorer = CLIPScorer(CLIP)
        scorer.score([Image.new("RGB", (500, 375), (200, 30, 30))], ["a red square"])
    clip_tokenizer = CLIPTokenizer.from_pretrained(CLIP)
    expect("CLIP tokenizer size", len(clip_tokenizer), vocab.CLIP_VOCAB_SIZE)
    lines.append(f"{CLIP}: {len(clip_tokenizer)} tokens" + (", scored an image" if load_weights else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rehearsal.hub_cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="HF hub cache folder to write (HF_HUB_CACHE)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--device", default=None, help="where the weights are created (default: cuda if present)")
    parser.add_argument("--force", action="store_true", help="rebuild repos that already exist at this scale")
    parser.add_argument("--check", action="store_true",
                        help="instead of building, resolve every hub id offline through the project's loaders "
                             "(run with HF_HUB_OFFLINE=1 HF_HUB_CACHE=CACHE)")
    parser.add_argument("--load-weights", action="store_true", help="with --check: also load every model")
    args = parser.parse_args(argv)
    if args.check:
        if "huggingface_hub" in sys.modules:  # it reads both variables once, at import
            raise RuntimeError("--check must run before huggingface_hub is imported")
        os.environ.update(HF_HUB_CACHE=str(Path(args.cache).resolve()), HF_HUB_OFFLINE="1")
        for line in check_cache(args.scale, args.load_weights):
            print(f"resolved {line}")
        return 0
    build_cache(args.cache, args.scale, args.device, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
