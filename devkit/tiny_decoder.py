"""A tiny image decoder trained on the synthetic data, so that the default reconstructions and generated
images show what their captions say.

    python -m devkit.tiny_decoder --data data/synthetic --sd data/models/tiny-sd --out data/models/tiny-decoder

Trains `PatchDecoder` (seed_lightning/tokenizer/patch_decoder.py: a plain conditional decoder network, not
diffusion) to draw each train caption from the tiny SD text encoder's [77, D] embedding of it: the interface of
Stable Diffusion, which the tokenizer's generation head imitates. A caption never says left or right (and half
of them not the row either), so a regression decoder trained on the photos would draw the average of every
place an object could be: a blur. The targets are therefore each caption's scene redrawn in a canonical
layout the caption itself fixes (`canonical_scene`): the background it names, its objects with their shapes,
colours and sizes at the centres of their cells, in the row the caption gives (the middle row when it gives
none) and in caption order from left to right. The images come out at the tokenizer's resolution (64 px).

Saves the decoder (``decoder/``) beside a copy of the text encoder and tokenizer it was trained on
(``text_encoder/``, ``tokenizer/``), and prints the held-out error of the trained and an untrained decoder.
Deterministic: same data and seed -> same weights (on the same number of threads).
"""

import argparse
import itertools
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from devkit import synthetic
from devkit.tiny_models import build_cached, warmup_cosine
from seed_lightning.core.data.shards import expand_urls, iter_tar_samples
from seed_lightning.core.errors import ConfigError, DataError
from seed_lightning.tokenizer.patch_decoder import PatchDecoder, PatchDecoderConfig
from seed_lightning.tokenizer.sd_text_encoder import SDTextEncoder

PLACED_TEMPLATES = (2, 4)
"""synthetic._caption templates that give each group's row (when the group sits in one row)."""
COLUMNS = {1: (1,), 2: (0, 2), 3: (0, 1, 2)}
"""Canonical columns of 1, 2 or 3 objects, left to right in caption order."""
PROGRESS_EVERY = 500
"""Training steps between progress lines."""


@dataclass(frozen=True)
class TinyDecoderSettings:
    """Size and training budget of the tiny decoder."""

    decoder: PatchDecoderConfig = field(default_factory=PatchDecoderConfig)
    """Network sizes (embedding_dim must be the SD text encoder's width)."""
    steps: int = 3000
    """Optimizer steps (fixed, not timed, so the result is deterministic)."""
    batch_size: int = 64
    """Captions per step."""
    lr: float = 2e-3
    """AdamW learning rate (cosine decay to 0 after 30 warm-up steps)."""
    foreground_weight: float = 4.0
    """Extra loss weight of object pixels: objects cover a tenth of an image, the background the rest."""
    seed: int = 0
    """Seed of the weights and of the batches."""


def canonical_scene(scene: synthetic.Scene, caption: str, size: int) -> synthetic.Scene:
    """`scene` as `caption` (one of its captions) fixes it, on a size x size canvas (see the module docstring)."""
    square = synthetic.Scene(size, size, scene.background, scene.objects)
    groups = synthetic._groups(square)
    for template in range(synthetic.NUM_CAPTION_TEMPLATES):
        for order in itertools.permutations(groups):
            if synthetic._caption(square, template, list(order)) != caption:
                continue
            named = []  # (object, its row) in caption order
            for group in order:
                row_given = template in PLACED_TEMPLATES and len({obj.row for obj in group}) == 1
                named += [(obj, obj.row if row_given else 1) for obj in group]
            objects = tuple(synthetic.SceneObject(obj.shape, obj.color, obj.size, row=row, col=col)
                            for (obj, row), col in zip(named, COLUMNS[len(named)]))
            return synthetic.Scene(size, size, scene.background, objects)
    raise DataError(f"caption {caption!r} does not describe its scene: regenerate the data (make data)")


@dataclass
class Targets:
    """Every caption of a split, with its canonical image [N, 3, S, S] (uint8)."""

    captions: list[str]
    images: torch.Tensor


def read_targets(pattern: str, size: int) -> Targets:
    """The captions of the shards matching `pattern` (scenes from their KEY.json) and their canonical images."""
    captions, images = [], []
    for url in expand_urls(pattern):
        for sample in iter_tar_samples(url):
            meta = json.loads(sample["json"]) if sample.get("json") else {}
            if "scene" not in meta:
                raise DataError(f"{url} has samples without a scene in KEY.json: train on the synthetic data")
            scene = synthetic.Scene(meta["width"], meta["height"], meta["scene"]["background"],
                                    tuple(synthetic.SceneObject(**obj) for obj in meta["scene"]["objects"]))
            for caption in meta["captions"]:
                image = synthetic.render(canonical_scene(scene, caption, size), rng=None)
                captions.append(caption)
                images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3))
    if not captions:
        raise DataError(f"no samples in {pattern!r}: run `python -m devkit.synthetic` first")
    return Targets(captions, torch.stack(images).permute(0, 3, 1, 2).contiguous())


@torch.no_grad()
def embed(text_encoder: SDTextEncoder, captions: list[str], batch_size: int = 512) -> torch.Tensor:
    return torch.cat([text_encoder(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)])


def weighted_error(pixels: torch.Tensor, target: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """Mean squared error, object pixels (those unlike the top-left corner, always background) weighted up."""
    foreground = (target - target[:, :, :1, :1]).abs().sum(1, keepdim=True).gt(0.1)
    return ((pixels - target).pow(2) * (1 + foreground_weight * foreground)).mean()


def train(decoder: PatchDecoder, embeddings: torch.Tensor, targets: torch.Tensor,
          settings: TinyDecoderSettings) -> None:
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=settings.lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, settings.steps, warmup=30)
    decoder.train()
    for step in range(1, settings.steps + 1):
        batch = torch.randint(len(embeddings), (settings.batch_size,), generator=generator)
        loss = weighted_error(decoder(embeddings[batch]), targets[batch].float() / 255,
                              settings.foreground_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % PROGRESS_EVERY == 0 or step == settings.steps:  # minutes of CPU: say how far it is
            print(f"tiny-decoder: step {step}/{settings.steps}, weighted pixel error {loss.item():.4f}", flush=True)
    decoder.eval()


@torch.no_grad()
def held_out_error(decoder: PatchDecoder, embeddings: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.mse_loss(decoder(embeddings), targets.float() / 255))


def build_tiny_decoder(data: str | Path, sd: str | Path, out: Path,
                       settings: TinyDecoderSettings = TinyDecoderSettings()) -> tuple[float, float]:
    """Train on ``data/shards/train-*.tar`` with the text encoder of the SD folder `sd`, save into `out`; returns
    the held-out (val) pixel error of the trained decoder and of an untrained one."""
    data, sd = Path(data), Path(sd)
    size = settings.decoder.image_size
    train_targets = read_targets(str(data / "shards" / "train-*.tar"), size)
    val_targets = read_targets(str(data / "shards" / "val-*.tar"), size)
    torch.manual_seed(settings.seed)
    text_encoder = SDTextEncoder.from_pretrained(sd)
    if text_encoder.hidden_size != settings.decoder.embedding_dim:
        raise ConfigError(f"the text encoder of {sd} is {text_encoder.hidden_size} wide, the decoder expects "
                          f"{settings.decoder.embedding_dim}: set embedding_dim to match")
    val_embeddings = embed(text_encoder, val_targets.captions)
    decoder = PatchDecoder(settings.decoder)
    untrained = held_out_error(decoder.eval(), val_embeddings, val_targets.images)
    train(decoder, embed(text_encoder, train_targets.captions), train_targets.images, settings)
    decoder.save_pretrained(out)
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(sd / part, out / part)
    return held_out_error(decoder, val_embeddings, val_targets.images), untrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.tiny_decoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/synthetic", help="synthetic data folder (shards/)")
    parser.add_argument("--sd", default="data/models/tiny-sd", help="the tiny SD whose text encoder conditions it")
    parser.add_argument("--out", default="data/models/tiny-decoder", help="output folder (skipped if it exists)")
    parser.add_argument("--steps", type=int, default=TinyDecoderSettings.steps, help="training steps")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output folder exists")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar per tiny file is noise in `make data`
    settings = TinyDecoderSettings(steps=args.steps)
    return build_cached(
        "tiny-decoder", Path(args.out), args.force, settings.seed,
        lambda folder: build_tiny_decoder(args.data, args.sd, folder, settings),
        lambda errors: f"held-out pixel error (MSE) {errors[0]:.4f}, untrained {errors[1]:.4f}",
    )


if __name__ == "__main__":
    sys.exit(main())
