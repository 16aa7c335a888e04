"""The real stage-1 train input pipeline: `ShardDataModule.train_dataloader()` with the data settings of the paper
config (conf/tokenizer/seed_v1.yaml: batch size, image size, crop, flip, shuffle buffer, ...; `jpeg_draft` and the
rest at their defaults), reading img2dataset shards of generated photo-like JPEGs of 500x375 (CC3M-like) and of
1024x768, in 4 / 8 / 16 DataLoader workers. Reports images/s over whole rounds of batches after the first round
(worker start-up), against what one GPU consumes in stage 1 (`--gpu-rate`), and how many workers feed 1.5x that.

    python bench/shard_pipeline.py [--workers 4 8 16] [--batches 20] [--gpu-rate 900]
    taskset -c 0-15 python bench/shard_pipeline.py    # the cores of one GPU on a larger host

The shards sit in the page cache: disk or network reads are not measured. The images are bench/rehearsal/data.py's
(the synthetic shapes world with sensor-like noise, JPEG quality 90: about as large as photos of their size).
"""

import argparse
import math
import multiprocessing
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from common import REPO, report
from seed_lightning.core.data.datamodule import ShardDataModule, ShardSource

PAPER_CONFIG = REPO / "conf" / "tokenizer" / "seed_v1.yaml"
SIZES = ((500, 375), (1024, 768))


def paper_data_settings(config: Path = PAPER_CONFIG) -> dict:
    """The `data:` block of a tokenizer config, less its shard paths."""
    data = yaml.safe_load(config.read_text())["data"]
    return {key: value for key, value in data.items() if key not in ("train", "val")}


def _write_shard(job: tuple[Path, int, int, int, int]) -> int:
    from webdataset import TarWriter

    from bench.rehearsal.data import image_text_samples

    path, width, height, number, count = job
    rng = random.Random(f"shard-pipeline-{width}x{height}-{number}")
    with TarWriter(str(path), mtime=0) as writer:
        for sample in image_text_samples(count, rng, [(width, height, "RGB", "JPEG")], count, first_shard=number):
            writer.write(sample)
    return path.stat().st_size


def write_shards(folder: Path, width: int, height: int, shards: int, per_shard: int) -> tuple[str, float]:
    """`shards` shards of `per_shard` JPEGs of width x height (drawn in parallel); their brace pattern and the mean
    JPEG size in KiB."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{width}x{height}-{number:04d}.tar", width, height, number, per_shard) for number in range(shards)]
    with multiprocessing.get_context("fork").Pool(min(shards, os.cpu_count() or 1)) as pool:
        total = sum(pool.map(_write_shard, jobs))
    return f"{folder}/{width}x{height}-{{0000..{shards - 1:04d}}}.tar", total / (shards * per_shard) / 1024


def pipeline_rate(settings: dict, pattern: str, workers: int, batches: int) -> tuple[float, int]:
    """(images/s, batches measured) of the module's train loader: after the first round of `workers` batches (every
    worker starting up at once), the time of whole rounds until at least `batches` more have arrived."""
    module = ShardDataModule(**{**settings, "train": [ShardSource(pattern)], "val": None, "num_workers": workers})
    loader = module.train_dataloader()
    rounds = max(1, math.ceil(batches / max(1, workers)))
    measured = rounds * max(1, workers)
    iterator: Iterator = iter(loader)
    for _ in range(max(1, workers)):
        module.on_after_batch_transfer(next(iterator), 0)
    start = time.perf_counter()
    for _ in range(measured):
        batch = module.on_after_batch_transfer(next(iterator), 0)
    seconds = time.perf_counter() - start
    assert batch["pixel_values"].shape[0] == settings["batch_size"]
    del iterator  # its workers stop
    return measured * settings["batch_size"] / seconds, measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batches", type=int, default=20, help="at least this many batches measured")
    parser.add_argument("--gpu-rate", type=float, default=900.0,
                        help="images/s one GPU trains on in stage 1 (one H200: about 700-900, bench/RESULTS.md)")
    parser.add_argument("--shards", type=int, default=16, help="shards per image size")
    parser.add_argument("--per-shard", type=int, default=128, help="images per shard")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only hands batches on, as in training
    settings = paper_data_settings()
    cores = len(os.sched_getaffinity(0))
    target = 1.5 * args.gpu_rate
    effective = {key: value for key, value in ShardDataModule(**settings).hparams.items() if key not in ("train", "val")}
    print(f"ShardDataModule as {PAPER_CONFIG.relative_to(REPO)} sets it (workers varied): {effective}; {cores} cores",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="shard-pipeline-") as folder:
        for width, height in SIZES:
            pattern, kib = write_shards(Path(folder), width, height, args.shards, args.per_shard)
            for workers in args.workers:
                rate, measured = pipeline_rate(settings, pattern, workers, args.batches)
                per_worker = rate / workers
                report("data", f"ShardDataModule train {width}x{height} workers={workers}", images_per_sec=rate,
                       per_worker=per_worker, gpu_rate=args.gpu_rate, ratio_to_gpu=rate / args.gpu_rate,
                       feeds_1_5x=rate >= target, workers_for_1_5x=math.ceil(target / per_worker),
                       cores_per_gpu_for_1_5x=math.ceil(target / per_worker) + 1,  # + the training process
                       paper_workers=settings["num_workers"], batch_size=settings["batch_size"],
                       batches_measured=measured, jpeg_kib=kib, cpu_cores=cores)


if __name__ == "__main__":
    main()
