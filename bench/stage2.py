"""Stage 2 (codebook + heads) epoch time: reading cached causal embeddings vs recomputing the encoders.

Both sides are the real CodebookModule (tokenizer stage 2) under a bf16-mixed Lightning Trainer at the
paper's 256 images/GPU: `cache_embeddings=True` (epoch 1 fills the disk cache, later epochs read it)
against `cache_embeddings=False` (every epoch re-runs the frozen ViT-g + Q-Former). L_gen is off on
both sides (its target, SD's CLIP text encoder, is a further frozen tower; see RESULTS.md).

    python bench/stage2.py --batch 256 2048 --batches 16 4 --compile
"""

import argparse
import tempfile
import time

import lightning as L
import torch

from common import REPO, lightning_trainer, loader, peak_memory_gib, random_captions, report, reset_memory

TEXT_TOKENIZER = str(REPO / "data/models/bert-tokenizer")


class EpochTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def run(cache: bool, batch: int, batches: int, epochs: int, compile: bool = False) -> list[float]:
    from seed_lightning.tokenizer.codebook import CodebookModule
    from seed_lightning.tokenizer.model import SeedTokenizerConfig

    reset_memory()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 224, 224, generator=generator).pin_memory()
    captions = random_captions(batch, generator)

    def make(index: int) -> dict:
        return {"pixel_values": pixels, "caption": captions, "key": [f"{index}-{i}" for i in range(batch)]}

    with tempfile.TemporaryDirectory() as cache_dir:
        with torch.device("cuda"):
            module = CodebookModule(model=SeedTokenizerConfig(), text_tokenizer=TEXT_TOKENIZER,
                                    cache_embeddings=cache, cache_dir=cache_dir, compile=compile)
        timer = EpochTimer()
        lightning_trainer(-1, [timer], max_epochs=epochs).fit(module, loader(make, batches))
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--batches", type=int, nargs="+", default=[16], help="batches per epoch, one per --batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure the cached side with compile=True")
    args = parser.parse_args()
    for batch, batches in zip(args.batch, args.batches, strict=True):
        images = batch * batches
        recompute = run(False, batch, batches, args.epochs)
        # Epoch 0 of each side includes warm-up (and, cached, the cache filling): compare the later epochs.
        recompute_epoch = min(recompute[1:])
        report("stage2", f"recompute encoders B={batch}", epoch_seconds=recompute, images_per_epoch=images,
               images_per_sec=images / recompute_epoch, peak_mem_gib=peak_memory_gib())
        for compile in [False, True] if args.compile else [False]:
            cached = run(True, batch, batches, args.epochs, compile)
            cached_epoch = min(cached[1:])
            report("stage2", f"project cached embeddings{' compiled' if compile else ''} B={batch}", epoch_seconds=cached,
                   images_per_epoch=images, images_per_sec=images / cached_epoch, first_epoch_fills_cache_s=cached[0],
                   speedup_vs_recompute=recompute_epoch / cached_epoch, peak_mem_gib=peak_memory_gib())


if __name__ == "__main__":
    main()
