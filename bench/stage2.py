"""Stage 2 (codebook + heads) epoch time: reading cached causal embeddings vs recomputing the encoders.

Project: the real CodebookModule (tokenizer stage 2) under a bf16-mixed Lightning Trainer with
`cache_embeddings=True` (epoch 1 fills the disk cache, later epochs read it), eager and with `compile`.
THE baseline (same run, same card, same batch and data): a plain step that recomputes the frozen encoders
every step, as plain transformers parts held in bf16 (ViT-g/14, ln_vision, Q-Former and its queries, run in
bf16 without autograd, SDPA), then trains the same codebook layers and heads (the project's modules and loss:
they have no transformers counterpart) in fp32 under bf16 autocast, with AdamW. Second row: the project's own
module with `cache_embeddings=False` (re-runs the frozen ViT-g + Q-Former every epoch). L_gen is off
everywhere (its target, SD's CLIP text encoder, is a further frozen tower; see RESULTS.md).

    python bench/stage2.py --batch 256 2048 --batches 16 4 --compile
"""

import argparse
import tempfile
import time

import lightning as L
import torch

from common import (
    REPO, cuda_time, image_caption_batches, lightning_trainer, loader, peak_memory_gib, plain_blip2_encoders,
    plain_causal_queries, plain_vit_tokens, report, reset_memory,
)

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


def codebook_module(**kwargs):
    from seed_lightning.tokenizer.codebook import CodebookModule
    from seed_lightning.tokenizer.model import SeedTokenizerConfig

    with torch.device("cuda"):
        return CodebookModule(model=SeedTokenizerConfig(), text_tokenizer=TEXT_TOKENIZER, **kwargs)


def run(cache: bool, batch: int, batches: int, epochs: int, compile: bool = False) -> list[float]:
    reset_memory()
    with tempfile.TemporaryDirectory() as cache_dir:
        module = codebook_module(cache_embeddings=cache, cache_dir=cache_dir, compile=compile)
        timer = EpochTimer()
        lightning_trainer(-1, [timer], max_epochs=epochs).fit(module, loader(image_caption_batches(batch), batches))
    return timer.seconds


def baseline(batch: int, batches: int) -> float:
    """Seconds per epoch of `batches` plain recompute steps (after one warm-up step)."""
    reset_memory()
    parts = plain_blip2_encoders(torch.bfloat16)
    for frozen in (parts.ln_vision, parts.qformer):
        frozen.requires_grad_(False).to(torch.bfloat16).eval()
    parts.queries = parts.queries.detach().to(torch.bfloat16)
    module = codebook_module(cache_embeddings=False)  # for its trained modules and loss; its encoders stay unused
    module.tokenizer.vision, module.tokenizer.qformer = None, None
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.05)
    sample = image_caption_batches(batch)(0)

    def step():
        pixels = sample["pixel_values"].cuda(non_blocking=True)
        with torch.no_grad():
            causal = plain_causal_queries(parts, plain_vit_tokens(parts.vision, pixels))
        with torch.autocast("cuda", torch.bfloat16):
            loss = module._codebook_losses(causal.float(), sample["caption"])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = cuda_time(step, warmup=1, iters=batches) * batches
    report("stage2", f"THE baseline: plain HF bf16 frozen encoders recomputed B={batch}", epoch_seconds=seconds,
           images_per_epoch=batch * batches, images_per_sec=batch * batches / seconds, peak_mem_gib=peak_memory_gib())
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--batches", type=int, nargs="+", default=[16], help="batches per epoch, one per --batch")
    parser.add_argument("--epochs", type=int, default=3, help="per Lightning run; the first is warm-up (and cache fill)")
    parser.add_argument("--compile", action="store_true", help="also measure the cached side with compile=True")
    args = parser.parse_args()
    for batch, batches in zip(args.batch, args.batches, strict=True):
        images = batch * batches
        baseline_epoch = baseline(batch, batches)
        recompute = run(False, batch, batches, args.epochs)
        # Epoch 0 of each Lightning run includes warm-up (and, cached, the cache filling): compare the later epochs.
        recompute_epoch = min(recompute[1:])
        report("stage2", f"project recompute encoders B={batch}", epoch_seconds=recompute, images_per_epoch=images,
               images_per_sec=images / recompute_epoch, ratio_to_baseline=baseline_epoch / recompute_epoch,
               peak_mem_gib=peak_memory_gib())
        for compile in [False, True] if args.compile else [False]:
            cached = run(True, batch, batches, args.epochs, compile)
            cached_epoch = min(cached[1:])
            report("stage2", f"project cached embeddings{' compiled' if compile else ''} B={batch}", epoch_seconds=cached,
                   images_per_epoch=images, images_per_sec=images / cached_epoch, first_epoch_fills_cache_s=cached[0],
                   ratio_to_baseline=baseline_epoch / cached_epoch, speedup_vs_project_recompute=recompute_epoch / cached_epoch,
                   peak_mem_gib=peak_memory_gib())


if __name__ == "__main__":
    main()
