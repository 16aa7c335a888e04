"""Offline tokenisation: every image of a set of image shards -> its SEED codes, once, into token shards.

    seed-lightning extract-tokens --tokenizer checkpoints/tiny/seed_tokenizer \
        --shards 'data/synthetic/shards/train-{000000..000003}.tar' --out data/synthetic/tokens --prefix train

Images go through the tokenizer's own preprocessing (the official inference input), batched, under no_grad.
Everything about the codes (how many per image, codebook size) comes from the saved tokenizer itself; the MLLM
checks them against its config when it trains.
Output: `{prefix}-{index:06d}.tar` with KEY.codes (int16), KEY.txt (the caption as stored) and KEY.json (the
image's metadata, e.g. image_id and all reference captions), written resumably by
`seed_lightning.mllm.tokens.extract_tokens`: rerunning after an interruption continues where it stopped.

Several ranks (torchrun, or torch.distributed already initialised) split the input shards round-robin
(rank r takes shards r, r + W, ...) and write `{prefix}-rank{r}-*.tar`, so `{prefix}-*.tar` matches the union.
The output folder records which tokenizer made it (`{prefix}-tokenizer.json`); codes from another tokenizer
are refused instead of being mixed in.
"""

import argparse
import hashlib
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from seed_lightning.core.data.shards import SkipSample, decode_image_sample, expand_urls, index_tar, iter_tar_samples
from seed_lightning.core.distributed import RankInfo, rank_info
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.io import write_json_atomic
from seed_lightning.core.pretrained import WEIGHTS_FILE
from seed_lightning.mllm.tokens import ExtractionSummary, extract_tokens
from seed_lightning.tokenizer.model import SeedTokenizer

TOKENIZER_RECORD = "{prefix}-tokenizer.json"


def shards_of_rank(urls: list[str], info: RankInfo) -> list[str]:
    """Round-robin split of the input shards: rank r takes shards r, r + W, r + 2W, ..."""
    return urls[info.rank::info.world_size]


def iter_images(
    urls: list[str], preprocess: Callable[[list[Image.Image]], torch.Tensor], skipped: Counter
) -> Iterator[tuple[str, str, dict[str, Any], torch.Tensor]]:
    """(key, caption, meta, pixels [3, S, S] = preprocess([image])[0]) for every usable sample, in shard order.

    A sample is usable when the training loaders could use it (`decode_image_sample`'s skip rules; skips are
    counted by reason); its caption is kept as stored, since training cleans it. The same input always gives
    the same sequence (extraction resume relies on it).
    """
    def transform(image: Image.Image, rng: random.Random) -> torch.Tensor:
        return preprocess([image])[0]  # the inference input: deterministic, `rng` goes unused

    rng = random.Random(0)
    for url in urls:
        for raw in iter_tar_samples(url, skipped):
            try:
                sample = decode_image_sample(raw, rng, transform)
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            yield sample["key"], raw["txt"].decode("utf-8", errors="replace").strip(), sample["meta"], sample["pixel_values"]


def tokenizer_fingerprint(directory: str | Path) -> str:
    """sha256 of the tokenizer's weights file: identifies which tokenizer made a token set."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_FILE, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_tokenizer_record(out_dir: Path, prefix: str, tokenizer_dir: str | Path, replace_stale: bool) -> None:
    """Record the tokenizer on the first run; tokens made by a different one are refused, or deleted when
    `replace_stale` (so that they are extracted again)."""
    record_path = out_dir / TOKENIZER_RECORD.format(prefix=prefix)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    if record_path.is_file():
        if json.loads(record_path.read_text())["sha256"] == fingerprint:
            return
        if not replace_stale:
            raise ConfigError(f"{out_dir} holds {prefix!r} tokens of a different tokenizer than {tokenizer_dir}; "
                              f"pass --replace-stale, delete {out_dir}/{prefix}-* or choose another --out")
        own_file = re.compile(rf"{re.escape(prefix)}-(\d{{6}}\.tar(\.tmp)?|manifest\.json|tokenizer\.json)")
        for stale in out_dir.iterdir():
            if own_file.fullmatch(stale.name):
                stale.unlink()
    write_json_atomic(record_path, {"tokenizer": str(tokenizer_dir), "sha256": fingerprint}, indent=2)


def extract_split(
    tokenizer_dir: str | Path,
    shards: str,
    out_dir: str | Path,
    prefix: str,
    batch_size: int = 64,
    maxcount: int = 10000,
    device: str | torch.device | None = None,
    progress: bool = True,
    tokenizer: SeedTokenizer | None = None,
    replace_stale: bool = False,
) -> ExtractionSummary:
    """Tokenize every image of `shards` with the SeedTokenizer saved in `tokenizer_dir` into token shards.

    A loaded `tokenizer` may be passed to skip reloading it (it must be the one saved in `tokenizer_dir`).
    Tokens of this prefix made by another tokenizer are an error, or are deleted and redone with `replace_stale`.
    """
    info = rank_info()
    if device is None:
        device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    tokenizer = (tokenizer or SeedTokenizer.load(tokenizer_dir)).to(device)
    out_dir = Path(out_dir)
    if info.world_size > 1:
        prefix = f"{prefix}-rank{info.rank}"
    _check_tokenizer_record(out_dir, prefix, tokenizer_dir, replace_stale)
    urls = shards_of_rank(expand_urls(shards), info)
    total = sum(len(index_tar(url).samples) for url in urls)
    skipped: Counter = Counter()

    @torch.no_grad()
    def encode(pixels: list[torch.Tensor]) -> torch.Tensor:
        codes = tokenizer.encode(torch.stack(pixels).to(device)).cpu()
        bar.update(len(pixels))
        return codes

    with tqdm(total=total, desc=f"extract {prefix}", unit="img", disable=not progress) as bar:
        samples = iter_images(urls, tokenizer.preprocess, skipped)
        summary = extract_tokens(encode, samples, out_dir, prefix, maxcount, batch_size)
    if skipped:
        print(f"extract {prefix}: skipped unusable samples {dict(skipped)}", file=sys.stderr)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seed-lightning extract-tokens", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="folder of a trained SeedTokenizer (SeedTokenizer.save)")
    parser.add_argument("--shards", required=True, help="image shards: '::'-separated brace/glob patterns")
    parser.add_argument("--out", required=True, help="output folder of the token shards")
    parser.add_argument("--prefix", default="tokens", help="shard name prefix, e.g. train or val")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded per forward pass")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per output shard")
    parser.add_argument("--device", default=None, help="torch device (default: this rank's GPU, else cpu)")
    parser.add_argument("--replace-stale", action="store_true",
                        help="delete and redo tokens of this prefix that a different tokenizer made")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str]) -> None:
    """`seed-lightning extract-tokens ARGV`."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.maxcount < 1:
        raise ConfigError("--batch-size and --maxcount must be >= 1")
    summary = extract_split(args.tokenizer, args.shards, args.out, args.prefix, args.batch_size, args.maxcount,
                            args.device, progress=not args.no_progress, replace_stale=args.replace_stale)
    print(f"{summary.num_samples} samples in {len(summary.shards)} token shards under {args.out} "
          f"({summary.num_resumed} already done before this run)")
