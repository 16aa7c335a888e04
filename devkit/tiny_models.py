"""Tiny randomly initialised stand-ins for the pretrained parts, built offline for the default configs.

``python -m devkit.tiny_models --corpus data/synthetic/corpus.txt --out data/models`` writes
(each part is skipped when its folder already exists; ``--force`` rebuilds):

- ``bert-tokenizer``: a lowercase WordPiece tokenizer with the corpus' words ([PAD]=0, [UNK], [CLS],
  [SEP], [MASK]), loadable with ``AutoTokenizer``.
- ``tiny-blip2``: a ``Blip2ForImageTextRetrieval`` checkpoint (ViT + Q-Former with its BERT text
  embeddings and ITC projections) plus the bert tokenizer files; its (tiny) ``text_config`` is unused.
  Load it as a whole (``Blip2ForImageTextRetrieval`` / ``Blip2Model``) and take ``.vision_model`` /
  ``.qformer``: ``Blip2VisionModel.from_pretrained(folder)`` finds none of its prefixed weights.
- ``tiny-sd``: a Stable Diffusion v1-style ``StableDiffusionPipeline`` folder (CLIP text encoder, an
  offline-trained ``CLIPTokenizer``, UNet, VAE, PNDM scheduler with SD v1 betas, no safety checker)
  that renders 32x32 images.
- ``tiny-opt``: an OPT causal LM with a byte-level BPE tokenizer (OPT's convention: ``</s>`` is
  both BOS, prepended to every text, and EOS; ``<pad>`` pads).

Weights come from fixed seeds, so a rebuild gives the same models.
"""

import argparse
import collections
import math
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tokenizers import normalizers, pre_tokenizers

from seed_lightning.core.errors import ConfigError, DataError

T = TypeVar("T")

BERT_TOKENIZER = "bert-tokenizer"
TINY_BLIP2 = "tiny-blip2"
TINY_SD = "tiny-sd"
TINY_OPT = "tiny-opt"


@dataclass(frozen=True)
class TinySizes:
    """Dimensions of the tiny models; configs and tests refer to these instead of repeating numbers."""

    image_size: int = 64
    """BLIP-2 ViT input resolution (pixels)."""
    patch_size: int = 8
    """BLIP-2 ViT patch size: (64 / 8)^2 + 1 = 65 image tokens."""
    vision_hidden_size: int = 96
    """BLIP-2 ViT width."""
    vision_intermediate_size: int = 384
    """BLIP-2 ViT MLP width."""
    vision_layers: int = 3
    """BLIP-2 ViT depth."""
    vision_heads: int = 4
    """BLIP-2 ViT attention heads."""
    qformer_hidden_size: int = 128
    """Q-Former width (the causal embedding size)."""
    qformer_intermediate_size: int = 512
    """Q-Former FFN width."""
    qformer_layers: int = 4
    """Q-Former depth; cross-attention every `cross_attention_frequency` layers."""
    qformer_heads: int = 4
    """Q-Former attention heads."""
    cross_attention_frequency: int = 2
    """A Q-Former layer cross-attends to the image every this many layers."""
    qformer_max_positions: int = 64
    """Q-Former text position embeddings (caption length limit)."""
    num_query_tokens: int = 32
    """Learned queries = codes per image."""
    itc_dim: int = 64
    """Image-text contrastive embedding size (BLIP-2's image_text_hidden_size)."""
    sd_text_hidden_size: int = 64
    """SD CLIP text encoder width = UNet cross-attention size = generation embedding size."""
    sd_text_layers: int = 2
    """SD CLIP text encoder depth."""
    sd_text_heads: int = 2
    """SD CLIP text encoder attention heads."""
    sd_text_intermediate_size: int = 128
    """SD CLIP text encoder MLP width."""
    sd_max_length: int = 77
    """SD prompt length (tokens, padded)."""
    sd_image_size: int = 32
    """Pixels of the images the tiny SD renders."""
    sd_latent_channels: int = 4
    """VAE latent channels."""
    opt_hidden_size: int = 128
    """OPT width."""
    opt_layers: int = 4
    """OPT depth."""
    opt_heads: int = 4
    """OPT attention heads."""
    opt_ffn_dim: int = 512
    """OPT FFN width."""
    opt_max_positions: int = 512
    """OPT context length."""
    opt_vocab_target: int = 2000
    """Upper bound on the OPT BPE vocabulary (the corpus may support fewer merges)."""
    clip_vocab_target: int = 1024
    """Upper bound on the CLIP BPE vocabulary."""
    bert_vocab_target: int = 1000
    """Upper bound on the WordPiece vocabulary."""


TINY = TinySizes()

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3, as in facebook/opt-*
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# In the WordPiece vocabulary (word-initial and "##" forms): any printable ASCII text tokenizes without [UNK].
ASCII_ALPHABET = [c for c in string.printable if not c.isspace()]


def read_corpus(corpus: str | Path) -> list[str]:
    path = Path(corpus)
    if not path.is_file():
        raise ConfigError(f"corpus file {path} not found; run `python -m devkit.synthetic` (make data) first")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"corpus file {path} is empty; regenerate it with `python -m devkit.synthetic --force`")
    return lines


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def learn_bpe(words: collections.Counter, max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over {symbol tuple: count}: merge the most frequent adjacent pair, ties to the smallest pair.

    Used instead of tokenizers' BpeTrainer, whose order of equally frequent merges differs between runs;
    the corpus is small enough (dozens of distinct words) for this plain loop.
    """
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = collections.Counter({_merge_pair(word, best): count for word, count in words.items()})
    return merges


def _word_counts(lines: list[str], pre_tokenizer, normalizer=None) -> collections.Counter:
    """Counts of the words a tokenizer's (normaliser and) pre-tokeniser cut the corpus into."""
    return collections.Counter(
        word for line in lines
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line) if normalizer else line)
    )


def bert_words(lines: list[str]) -> list[str]:
    """The corpus' words as BERT's uncased normaliser and pre-tokeniser cut them, most frequent first."""
    counts = _word_counts(lines, pre_tokenizers.BertPreTokenizer(), normalizers.BertNormalizer(lowercase=True))
    return sorted(counts, key=lambda word: (-counts[word], word))


def clip_bpe_words(lines: list[str]) -> collections.Counter:
    """The corpus as CLIP's BPE learns from it: {symbols of a word, the last one ending in "</w>": count}."""
    from transformers import CLIPTokenizer

    clip_pipeline = CLIPTokenizer().backend_tokenizer  # CLIP's normaliser and pre-tokeniser, empty vocabulary
    words = _word_counts(lines, clip_pipeline.pre_tokenizer, clip_pipeline.normalizer)
    return collections.Counter({(*word[:-1], word[-1] + "</w>"): count for word, count in words.items()})


def opt_bpe_words(lines: list[str]) -> collections.Counter:
    """The corpus as OPT's (GPT-2's) byte-level BPE learns from it, without prefix spaces: {symbols: count}."""
    words = _word_counts(lines, pre_tokenizers.ByteLevel(add_prefix_space=False))
    return collections.Counter({tuple(word): count for word, count in words.items()})


def build_bert_tokenizer(lines: list[str], out: Path) -> None:
    """WordPiece over the corpus' whole words (most frequent first) plus every printable ASCII character.

    Whole words rather than tokenizers' WordPieceTrainer: its tie-breaking differs from run to run, and on
    this small corpus every word fits the vocabulary anyway.
    """
    from transformers import BertTokenizer

    characters = sorted({c.lower() for c in ASCII_ALPHABET})
    tokens = list(dict.fromkeys([*BERT_SPECIAL_TOKENS, *characters, *("##" + c for c in characters), *bert_words(lines)]))
    vocab = {token: i for i, token in enumerate(tokens[: TINY.bert_vocab_target])}
    # BertTokenizer builds BERT's normaliser, pre-tokeniser and [CLS] ... [SEP] template around the vocab.
    BertTokenizer(vocab=vocab, model_max_length=TINY.qformer_max_positions).save_pretrained(out)


def build_clip_tokenizer(lines: list[str]):
    """A CLIPTokenizer whose BPE (CLIP's byte-level "</w>" format) is learnt from the corpus."""
    from transformers import CLIPTokenizer

    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = byte_alphabet + [c + "</w>" for c in byte_alphabet]
    merges = learn_bpe(clip_bpe_words(lines), TINY.clip_vocab_target - len(base) - 2)
    # CLIP's vocabulary layout: every byte symbol, every byte symbol ending a word, the merges, then the
    # two special tokens last (CLIPTextModel's legacy pooling looks for the highest id).
    tokens = list(dict.fromkeys(base + [left + right for left, right in merges])) + [CLIP_BOS, CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY.sd_max_length)


def build_opt_tokenizer(lines: list[str]):
    """A byte-level BPE learnt from the corpus, in OPT's GPT-2 format (no prefix space, </s> prepended)."""
    from transformers import GPT2Tokenizer

    base = list(OPT_SPECIAL_TOKENS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_bpe(opt_bpe_words(lines), TINY.opt_vocab_target - len(base))
    tokens = list(dict.fromkeys(base + [left + right for left, right in merges]))
    return GPT2Tokenizer(
        vocab={token: i for i, token in enumerate(tokens)}, merges=merges, bos_token="</s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", add_bos_token=True, model_max_length=TINY.opt_max_positions,
    )


def build_tiny_blip2(bert_tokenizer_dir: Path, out: Path) -> None:
    """Saves the model, then copies the bert tokenizer files beside it (as BLIP-2 ITM checkpoints ship)."""
    from transformers import AutoTokenizer, Blip2Config, Blip2ForImageTextRetrieval

    tokenizer = AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    config = Blip2Config(
        vision_config=dict(
            image_size=TINY.image_size, patch_size=TINY.patch_size, hidden_size=TINY.vision_hidden_size,
            intermediate_size=TINY.vision_intermediate_size, num_hidden_layers=TINY.vision_layers,
            num_attention_heads=TINY.vision_heads,
            # transformers' default (1e-10) would leave the frozen random ViT outputting constants.
            initializer_range=0.02,
        ),
        qformer_config=dict(
            hidden_size=TINY.qformer_hidden_size, num_hidden_layers=TINY.qformer_layers,
            num_attention_heads=TINY.qformer_heads, intermediate_size=TINY.qformer_intermediate_size,
            cross_attention_frequency=TINY.cross_attention_frequency, encoder_hidden_size=TINY.vision_hidden_size,
            vocab_size=len(tokenizer), max_position_embeddings=TINY.qformer_max_positions,
            use_qformer_text_input=True, pad_token_id=tokenizer.pad_token_id,
        ),
        # Unused by the retrieval model; tiny so that loading the folder as Blip2Model stays cheap.
        text_config=dict(
            model_type="opt", hidden_size=TINY.opt_hidden_size, num_hidden_layers=TINY.opt_layers,
            ffn_dim=TINY.opt_ffn_dim, num_attention_heads=TINY.opt_heads, word_embed_proj_dim=TINY.opt_hidden_size,
        ),
        num_query_tokens=TINY.num_query_tokens,
        image_text_hidden_size=TINY.itc_dim,
    )
    model = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)  # BLIP-2's query init; transformers zero-fills them
    model.save_pretrained(out)
    for file in bert_tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)


def build_tiny_sd(lines: list[str], out: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(lines)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY.sd_text_hidden_size,
        intermediate_size=TINY.sd_text_intermediate_size, num_hidden_layers=TINY.sd_text_layers,
        num_attention_heads=TINY.sd_text_heads, max_position_embeddings=TINY.sd_max_length,
        projection_dim=TINY.sd_text_hidden_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae_channels = (32, 64)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=vae_channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        latent_channels=TINY.sd_latent_channels, sample_size=TINY.sd_image_size,
    )
    vae_scale = 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(
        # sample_size sets the pipeline's default output: latent size x vae_scale = sd_image_size.
        sample_size=TINY.sd_image_size // vae_scale, in_channels=TINY.sd_latent_channels,
        out_channels=TINY.sd_latent_channels, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY.sd_text_hidden_size, attention_head_dim=8,
    )
    # CompVis/stable-diffusion-v1-4's scheduler settings.
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(out)


def build_tiny_opt(lines: list[str], out: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = build_opt_tokenizer(lines)
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=TINY.opt_hidden_size, num_hidden_layers=TINY.opt_layers,
        ffn_dim=TINY.opt_ffn_dim, num_attention_heads=TINY.opt_heads,
        max_position_embeddings=TINY.opt_max_positions, word_embed_proj_dim=TINY.opt_hidden_size,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    OPTForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_once(out: Path, name: str, build: Callable[[Path], None], seed: int, force: bool) -> Path:
    """Builds one part into a staging folder and renames it into place, so a folder that exists is complete."""
    target = out / name
    if target.exists() and not force:
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    try:
        torch.manual_seed(seed)
        build(staging)
        staging.chmod(0o755)  # mkdtemp (and some writers) make things private
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The trained fixtures' schedule: linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )


def build_cached(name: str, out: Path, force: bool, seed: int, build: Callable[[Path], T],
                 report: Callable[[T], str]) -> int:
    """A trained fixture's command: skips an existing `out` (unless `force`), else runs `build(folder)` into it (see
    `_build_once`) and prints `name`, the time it took and `report(result)`. A ConfigError / DataError prints one
    line and returns 2."""
    if out.exists() and not force:
        print(f"{name}: {out} exists (use --force to rebuild)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[T] = []
    started = time.monotonic()
    try:
        _build_once(out.parent, out.name, lambda folder: results.append(build(folder)), seed, force=True)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{name}: {out} ({time.monotonic() - started:.0f} s); {report(results[0])}")
    return 0


def build_all(corpus: str | Path, out: str | Path, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Builds every tiny part under `out` (skipping existing ones unless `force`); returns name -> folder."""
    lines = read_corpus(corpus)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders = {}
    folders[BERT_TOKENIZER] = _build_once(out, BERT_TOKENIZER, lambda d: build_bert_tokenizer(lines, d), seed, force)
    folders[TINY_BLIP2] = _build_once(
        out, TINY_BLIP2, lambda d: build_tiny_blip2(folders[BERT_TOKENIZER], d), seed, force
    )
    folders[TINY_SD] = _build_once(out, TINY_SD, lambda d: build_tiny_sd(lines, d), seed, force)
    folders[TINY_OPT] = _build_once(out, TINY_OPT, lambda d: build_tiny_opt(lines, d), seed, force)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="data/synthetic/corpus.txt", help="text to train the tokenizers on")
    parser.add_argument("--out", default="data/models", help="output folder (default: data/models)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="rebuild parts that already exist")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per tiny file is noise in `make data`
    try:
        folders = build_all(args.corpus, args.out, seed=args.seed, force=args.force)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    for name, folder in folders.items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
