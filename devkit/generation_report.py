"""Whether the default images mean something: CLIP numbers on the default val set, trained vs untrained, scored
by the tiny CLIP as the validation callbacks score them (100 x mean cosine, seed_lightning/core/clip_score.py).

    python -m devkit.generation_report        # after `make train-mllm`

Over the first --images val images (their first caption), through the tiny decoder:
- decoder: CLIP score of the images it draws from the SD text encoder's caption embeddings, trained decoder vs
  an untrained one (the decoder alone: the best a tokenizer's generation embeddings can reach);
- tokenizer: reconstruction CLIP similarity (original vs the image rebuilt from its codes, the paper's metric),
  the trained tokenizer vs the same architecture with random weights;
- MLLM: CLIP score of images generated from the captions (codes sampled as CLIPScoreCallback samples them)
  vs images from random codes.
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from devkit.tiny_clip import read_captioned_images
from seed_lightning.core.clip_score import CLIPScorer, clip_score, image_image_similarity
from seed_lightning.core.errors import ConfigError, DataError
from seed_lightning.tokenizer.image_decoder import ImageDecoder, TinyImageDecoder
from seed_lightning.tokenizer.patch_decoder import PatchDecoder
from seed_lightning.tokenizer.sd_text_encoder import SDTextEncoder


@dataclass
class ValImages:
    images: list[Image.Image]
    captions: list[str]
    """The first reference caption of each image (what the tokenizer's generation head learnt to imitate)."""


def read_val_images(pattern: str, count: int) -> ValImages:
    images, captions = read_captioned_images(pattern, limit=count)
    return ValImages(images, [references[0] for references in captions])


@torch.no_grad()
def text_image_score(scorer: CLIPScorer, images: list[Image.Image], captions: list[str]) -> float:
    return float(clip_score(scorer.image_features(images), scorer.text_features(captions)))


@torch.no_grad()
def image_image_score(scorer: CLIPScorer, images: list[Image.Image], others: list[Image.Image]) -> float:
    return float(image_image_similarity(scorer.image_features(images), scorer.image_features(others)))


@torch.no_grad()
def decoder_scores(decoder_dir: str, scorer: CLIPScorer, val: ValImages, seed: int) -> tuple[float, float]:
    """CLIP score of the trained decoder's images of the val captions, and of an untrained decoder's."""
    decoder = TinyImageDecoder.from_pretrained(decoder_dir)
    embeddings = SDTextEncoder.from_pretrained(decoder_dir)(val.captions)
    torch.manual_seed(seed)
    untrained = TinyImageDecoder(PatchDecoder(decoder.network.config))
    return (text_image_score(scorer, decoder(embeddings), val.captions),
            text_image_score(scorer, untrained(embeddings), val.captions))


@torch.no_grad()
def tokenizer_scores(tokenizer_dir: str, decoder: ImageDecoder, scorer: CLIPScorer, val: ValImages,
                     seed: int) -> tuple[float, float]:
    """Reconstruction CLIP similarity of the trained tokenizer and of the same architecture untrained."""
    from seed_lightning.tokenizer.model import SeedTokenizer

    trained = SeedTokenizer.load(tokenizer_dir)
    torch.manual_seed(seed)
    untrained = SeedTokenizer(trained.config).eval()
    scores = []
    for tokenizer in (trained, untrained):
        rebuilt = decoder(tokenizer.decode(tokenizer.encode(tokenizer.preprocess(val.images))))
        scores.append(image_image_score(scorer, val.images, rebuilt))
    return scores[0], scores[1]


@torch.no_grad()
def mllm_scores(mllm_dir: str, tokenizer_dir: str, decoder: ImageDecoder, scorer: CLIPScorer, val: ValImages,
                seed: int) -> tuple[float, float]:
    """CLIP score of images generated from the val captions, and of images from uniformly random codes."""
    from seed_lightning.mllm.model import MultimodalLM
    from seed_lightning.tokenizer.model import SeedTokenizer

    mllm = MultimodalLM.load(mllm_dir)
    tokenizer = SeedTokenizer.load(tokenizer_dir)
    generated = torch.cat([mllm.generate_image_codes([caption], seed=seed + index)
                           for index, caption in enumerate(val.captions)])
    random_codes = torch.randint(tokenizer.config.num_codes, generated.shape,
                                 generator=torch.Generator().manual_seed(seed))
    return tuple(text_image_score(scorer, decoder(tokenizer.decode(codes)), val.captions)
                 for codes in (generated, random_codes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.generation_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/synthetic", help="synthetic data folder (shards/val-*.tar)")
    parser.add_argument("--decoder", default="data/models/tiny-decoder", help="the image decoder")
    parser.add_argument("--clip", default="data/models/tiny-clip", help="the CLIP model that scores")
    parser.add_argument("--tokenizer", default="checkpoints/tiny/seed_tokenizer", help="a trained SEED tokenizer")
    parser.add_argument("--mllm", default="checkpoints/tiny/mllm/export/merged", help="a trained multimodal LM")
    parser.add_argument("--images", type=int, default=64, help="val images scored (the first ones)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the untrained weights and of the sampling")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        for path in (args.decoder, args.clip, args.tokenizer, args.mllm):
            if not Path(path).is_dir():
                raise ConfigError(f"{path} does not exist: run `make data` and `make train-mllm` first")
        val = read_val_images(str(Path(args.data) / "shards" / "val-*.tar"), args.images)
        scorer = CLIPScorer(args.clip)
        decoder = ImageDecoder.from_pretrained(args.decoder)
        rows = [
            ("decoder: CLIP score of its images of the captions", decoder_scores(args.decoder, scorer, val, args.seed)),
            ("tokenizer: reconstruction CLIP similarity",
             tokenizer_scores(args.tokenizer, decoder, scorer, val, args.seed)),
            ("MLLM: CLIP score of generated images (vs random codes)",
             mllm_scores(args.mllm, args.tokenizer, decoder, scorer, val, args.seed)),
        ]
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(val.captions)} val images, scored by {args.clip}\n")
    print(f"| {'':56} | trained | untrained |\n| {'-' * 56} | ------- | --------- |")
    for name, (trained, untrained) in rows:
        print(f"| {name:56} | {trained:7.1f} | {untrained:9.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
