"""The image pipeline alone: JPEG decode + random-resized-crop 224 (bicubic) + flip + CLIP normalise.

Runs the project's ImageTransform(train=True) on generated JPEGs of CC3M-like size (500x375) and of
full photo size (1024x768), in N worker processes, and reports images/s (per machine and per core).

    python bench/data_pipeline.py --workers 1 4 8 16

bench/shard_pipeline.py measures the whole train loader (shards, ShardDataModule, DataLoader workers) instead.
"""

import argparse
import io
import multiprocessing
import os
import random
import time

from PIL import Image, ImageFilter

from common import report  # noqa: F401  (also puts the repo on sys.path)


def make_jpegs(width: int, height: int, count: int) -> list[bytes]:
    """Photo-like JPEGs (smooth noise, quality 90): random pixels would decode slower than photos."""
    rng = random.Random(0)
    images = []
    for _ in range(count):
        small = Image.frombytes("RGB", (width // 16, height // 16), rng.randbytes(3 * (width // 16) * (height // 16)))
        image = small.resize((width, height), Image.Resampling.BICUBIC).filter(ImageFilter.DETAIL)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def _decode_all(args) -> int:
    jpegs, seed, draft = args
    import torch

    torch.set_num_threads(1)  # as in DataLoader workers: one intra-op thread per worker process
    from seed_lightning.core.data.transforms import ImageTransform

    transform = ImageTransform(train=True, jpeg_draft=draft)
    rng = random.Random(seed)
    for data in jpegs:
        transform(Image.open(io.BytesIO(data)), rng)
    return len(jpegs)


def throughput(jpegs: list[bytes], workers: int, repeats: int, draft: bool) -> float:
    jobs = [(jpegs, seed, draft) for seed in range(workers * repeats)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_all, [(jpegs[:4], 0, draft)] * workers)  # start-up and imports outside the timing
        start = time.perf_counter()
        done = sum(pool.map(_decode_all, jobs))
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = os.cpu_count()
    for width, height in ((500, 375), (1024, 768)):
        jpegs = make_jpegs(width, height, args.images)
        kib = sum(map(len, jpegs)) / len(jpegs) / 1024
        for draft in (True, False) if width > 500 else (True,):
            for workers in args.workers:
                if workers > cores:
                    continue
                rate = throughput(jpegs, workers, args.repeats, draft)
                report("data", f"ImageTransform train {width}x{height} draft={draft} workers={workers}",
                       images_per_sec=rate, per_worker=rate / workers, cpu_cores=cores, jpeg_kib=kib)


if __name__ == "__main__":
    main()
