"""A tiny CLIP trained on the synthetic data, so that the default CLIP score means something offline.

    python -m devkit.tiny_clip --data data/synthetic --out data/models/tiny-clip

Trains a small ``CLIPModel`` (64 px ViT, 2-layer text tower, a CLIP BPE tokenizer learnt from the
corpus like tiny-sd's) contrastively on the train shards for a fixed number of steps (~40 s on one
CPU core), then saves the model and its ``CLIPProcessor`` side by side (what ``CLIPScorer`` and
torchmetrics load) and prints the held-out CLIP score of matched vs. mismatched val pairs.
Deterministic: same data and seed -> same weights.
"""

import argparse
import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from devkit.tiny_models import build_cached, build_clip_tokenizer, read_corpus, warmup_cosine
from seed_lightning.core.clip_score import clip_score
from seed_lightning.core.data.shards import expand_urls, iter_tar_samples
from seed_lightning.core.data.transforms import CLIP_MEAN, CLIP_STD, to_rgb
from seed_lightning.core.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class TinyCLIPSettings:
    """Size and training budget of the tiny CLIP."""

    image_size: int = 64
    """Input resolution (pixels) of the vision tower."""
    patch_size: int = 8
    """ViT patch size: (64 / 8)^2 = 64 patches."""
    hidden_size: int = 64
    """Width of both towers."""
    layers: int = 2
    """Depth of both towers."""
    heads: int = 2
    """Attention heads of both towers."""
    projection_dim: int = 64
    """Size of the joint embedding."""
    steps: int = 150
    """Optimizer steps (fixed, not timed, so the result is deterministic)."""
    batch_size: int = 128
    """Image-caption pairs per step."""
    lr: float = 2e-3
    """AdamW learning rate (cosine decay to 0 after 10 warm-up steps)."""
    seed: int = 0
    """Seed of the weights, the caption choice and the flips."""


@dataclass
class Pairs:
    """Preprocessed images [N, 3, S, S] and, per image, all its reference captions."""

    pixel_values: torch.Tensor
    captions: list[list[str]]


def read_captioned_images(pattern: str, limit: int | None = None) -> tuple[list[Image.Image], list[list[str]]]:
    """The image-caption samples of the shards matching `pattern` (the first `limit` of them, None: all): RGB
    images and, per image, all its reference captions (KEY.json's, else KEY.txt; the first is KEY.txt's)."""
    images, captions = [], []
    for url in expand_urls(pattern):
        for sample in iter_tar_samples(url):
            extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if extension is None or sample.get("txt") is None:
                continue
            images.append(to_rgb(Image.open(io.BytesIO(sample[extension]))))
            meta = json.loads(sample["json"]) if sample.get("json") else {}
            captions.append(list(meta.get("captions") or [sample["txt"].decode("utf-8")]))
            if len(images) == limit:
                return images, captions
    if not images:
        raise DataError(f"no image-caption samples in {pattern!r}: run `python -m devkit.synthetic` first")
    return images, captions


def read_pairs(pattern: str, processor: CLIPProcessor) -> Pairs:
    """Every sample of the shards matching `pattern`, images through the CLIP image processor."""
    images, captions = read_captioned_images(pattern)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    return Pairs(pixel_values, captions)


def build_processor(tokenizer: CLIPTokenizer, settings: TinyCLIPSettings) -> CLIPProcessor:
    side = settings.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(tokenizer: CLIPTokenizer, settings: TinyCLIPSettings) -> CLIPModel:
    tower = dict(hidden_size=settings.hidden_size, intermediate_size=4 * settings.hidden_size,
                 num_hidden_layers=settings.layers, num_attention_heads=settings.heads)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                         **tower, **special),
        vision_config=dict(image_size=settings.image_size, patch_size=settings.patch_size, **tower),
        projection_dim=settings.projection_dim,
    )
    return CLIPModel(config)


def train(model: CLIPModel, processor: CLIPProcessor, pairs: Pairs, settings: TinyCLIPSettings) -> None:
    """Symmetric InfoNCE (CLIPModel's own loss) on random (image, one of its captions) batches, random h-flips
    (the synthetic captions never mention left or right)."""
    rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, settings.steps, warmup=10)
    model.train()
    count = len(pairs.captions)
    for _ in range(settings.steps):
        batch = torch.randperm(count, generator=generator)[: settings.batch_size]
        pixel_values = pairs.pixel_values[batch]
        flip = torch.rand(len(batch), generator=generator) < 0.5
        pixel_values = torch.where(flip.view(-1, 1, 1, 1), pixel_values.flip(-1), pixel_values)
        texts = [rng.choice(pairs.captions[i]) for i in batch.tolist()]
        tokens = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        loss = model(**tokens, pixel_values=pixel_values, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


@torch.no_grad()
def matched_and_mismatched_scores(model: CLIPModel, processor: CLIPProcessor, pairs: Pairs) -> tuple[float, float]:
    """CLIP score (torchmetrics convention) of each image with its first caption, and with the next image's."""
    image_features = model.get_image_features(pixel_values=pairs.pixel_values).pooler_output
    tokens = processor.tokenizer([c[0] for c in pairs.captions], padding=True, truncation=True, return_tensors="pt")
    text_features = model.get_text_features(**tokens).pooler_output
    matched = clip_score(image_features, text_features)
    mismatched = clip_score(image_features, text_features.roll(1, dims=0))
    return float(matched), float(mismatched)


def build_tiny_clip(data: str | Path, out: Path, settings: TinyCLIPSettings = TinyCLIPSettings()) -> tuple[float, float]:
    """Train on ``data/shards/train-*.tar``, save into `out`; returns held-out (matched, mismatched) CLIP scores."""
    data = Path(data)
    torch.manual_seed(settings.seed)
    tokenizer = build_clip_tokenizer(read_corpus(data / "corpus.txt"))
    processor = build_processor(tokenizer, settings)
    model = build_model(tokenizer, settings)
    train(model, processor, read_pairs(str(data / "shards" / "train-*.tar"), processor), settings)
    scores = matched_and_mismatched_scores(model, processor, read_pairs(str(data / "shards" / "val-*.tar"), processor))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.tiny_clip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/synthetic", help="synthetic data folder (corpus.txt, shards/)")
    parser.add_argument("--out", default="data/models/tiny-clip", help="output folder (skipped if it exists)")
    parser.add_argument("--steps", type=int, default=TinyCLIPSettings.steps, help="training steps")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output folder exists")
    args = parser.parse_args(argv)
    settings = TinyCLIPSettings(steps=args.steps)
    return build_cached(
        "tiny-clip", Path(args.out), args.force, settings.seed,
        lambda folder: build_tiny_clip(args.data, folder, settings),
        lambda scores: f"held-out CLIP score matched {scores[0]:.1f}, mismatched {scores[1]:.1f}",
    )


if __name__ == "__main__":
    sys.exit(main())
