"""Stage 2 (codebook + heads) epoch time: reading cached frozen-tower outputs vs recomputing the towers.

Project: the real CodebookModule (tokenizer stage 2) under a bf16-mixed Lightning Trainer with
`cache_embeddings=True` (epoch 1 fills the disk cache, later epochs read it), eager and with `compile`.
THE baseline (same run, same card, same batch and data): a plain step that recomputes the frozen towers
every step, as plain transformers parts held in bf16 (ViT-g/14, ln_vision, Q-Former and its queries, run in
bf16 without autograd, SDPA), then trains the same codebook layers and heads (the project's modules and loss:
they have no transformers counterpart) in fp32 under bf16 autocast, with AdamW. Last row: the project's own
module with `cache_embeddings=False` (re-runs its frozen towers every epoch).

With `--gen` every row also has the generation loss L_gen: its target is SD v1.4's text encoder (CLIP ViT-L/14's
text tower, 768 wide, 12 layers, 77 tokens; random weights, built here in SD's folder layout). THE baseline runs it
in bf16 on every step's captions; the project caches its output per caption (`generation_targets/`) like the
causal embeddings. Every batch has captions of its own, as real data has.

    python bench/stage2.py --batch 256 2048 --batches 16 4 --compile [--gen]
    python bench/stage2.py --tiny --gen --batch 8 --batches 2 --epochs 2   # CPU smoke test (tests/bench/test_stage2.py)
"""

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from common import (
    REPO, SCALE, RepeatedBatches, cuda_time, image_caption_batches, lightning_trainer, loader, parse_args,
    peak_memory_gib, plain_blip2_encoders, plain_causal_queries, plain_vit_tokens, report, reset_memory, synchronize,
)

TEXT_TOKENIZER = str(REPO / "data/models/bert-tokenizer")


class EpochTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        synchronize()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        synchronize()
        self.seconds.append(time.perf_counter() - self._start)


def generation_target_folder(folder: Path) -> str:
    """A Stable Diffusion v1 folder with what L_gen's target loads: `text_encoder/` (random weights, `SCALE`'s dims of
    bench/rehearsal's hub models: full-size unless tiny) and `tokenizer/` (a 49,408-entry CLIP BPE)."""
    from bench.rehearsal import hub_cache, vocab

    with SCALE.device:
        hub_cache.sd_text_encoder(hub_cache.SCALES[SCALE.dims]).save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    vocab.write_clip_tokenizer(folder / "tokenizer", vocab.corpus_lines(), with_tokenizer_json=False)
    return str(folder)


def codebook_module(**kwargs):
    from seed_lightning.tokenizer.codebook import CodebookModule
    from seed_lightning.tokenizer.model import SeedTokenizerConfig

    with SCALE.device:
        return CodebookModule(model=SeedTokenizerConfig.from_dict(SCALE.tokenizer_model), text_tokenizer=TEXT_TOKENIZER,
                              **kwargs)


def run(cache: bool, batch: int, batches: int, epochs: int, generation_target: str | None,
        compile: bool = False, workers: int = 0) -> list[float]:
    """Seconds of each epoch. With `workers`, the cached outputs are attached in that many DataLoader workers, as
    `ShardDataModule` has them attached (`CodebookModule.frozen_outputs`, connected at setup); without, in the main
    process (`transfer_batch_to_device`)."""
    reset_memory()
    with tempfile.TemporaryDirectory() as cache_dir:
        module = codebook_module(cache_embeddings=cache, cache_dir=cache_dir, compile=compile,
                                 generation_target=generation_target)
        make = image_caption_batches(batch)
        if workers:
            def attached(index: int) -> dict:  # runs in the workers, after setup made the caches
                outputs = module.frozen_outputs
                return make(index) if outputs is None else outputs(make(index), 0, index)

            batches_loader = torch.utils.data.DataLoader(RepeatedBatches(attached, batches), batch_size=None,
                                                         num_workers=workers, pin_memory=True)
        else:
            batches_loader = loader(make, batches)
        timer = EpochTimer()
        lightning_trainer(-1, [timer], max_epochs=epochs).fit(module, batches_loader)
    return timer.seconds


def baseline(batch: int, batches: int, generation_target: str | None, name: str) -> float:
    """Seconds per epoch of `batches` plain recompute steps (after one warm-up step)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    reset_memory()
    parts = plain_blip2_encoders(torch.bfloat16)
    for frozen in (parts.ln_vision, parts.qformer):
        frozen.requires_grad_(False).to(torch.bfloat16).eval()
    parts.queries = parts.queries.detach().to(torch.bfloat16)
    # For its trained modules and loss; its own frozen towers stay unused (this step runs plain bf16 ones and hands
    # `_losses` the L_gen targets).
    module = codebook_module(cache_embeddings=False, generation_target=generation_target)
    module.tokenizer.vision, module.tokenizer.qformer = None, None
    if generation_target is not None:  # SD's text encoder as `from_pretrained(dtype=torch.bfloat16)` loads it
        text_encoder = CLIPTextModel.from_pretrained(generation_target, subfolder="text_encoder", dtype=torch.bfloat16,
                                                     attn_implementation="sdpa").to(SCALE.device).eval()
        clip_tokenizer = CLIPTokenizer.from_pretrained(generation_target, subfolder="tokenizer")
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.05)
    make = image_caption_batches(batch)
    samples = [make(index) for index in range(batches)]
    index = iter(range(10**9))

    def step():
        sample = samples[next(index) % batches]
        pixels = sample["pixel_values"].to(SCALE.device, non_blocking=True)
        targets = {}
        with torch.no_grad():
            causal = plain_causal_queries(parts, plain_vit_tokens(parts.vision, pixels))
            if generation_target is not None:
                ids = clip_tokenizer(sample["caption"], padding="max_length", max_length=77, truncation=True,
                                     return_tensors="pt").input_ids.to(SCALE.device)
                targets["generation_targets"] = text_encoder(input_ids=ids).last_hidden_state
        with torch.autocast(SCALE.device.type, torch.bfloat16):
            loss = module._losses(causal.float(), {"caption": sample["caption"], **targets})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = cuda_time(step, warmup=1, iters=batches) * batches
    report("stage2", f"THE baseline: plain HF bf16 frozen towers recomputed{name} B={batch}", epoch_seconds=seconds,
           images_per_epoch=batch * batches, images_per_sec=batch * batches / seconds, peak_mem_gib=peak_memory_gib())
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--batches", type=int, nargs="+", default=[16], help="batches per epoch, one per --batch")
    parser.add_argument("--epochs", type=int, default=3, help="per Lightning run; the first is warm-up (and cache fill)")
    parser.add_argument("--compile", action="store_true", help="also measure the cached side with compile=True")
    parser.add_argument("--gen", action="store_true", help="with L_gen (its target a random SD v1.4 text encoder)")
    parser.add_argument("--workers", type=int, default=0,
                        help="also measure the cached side with its reads in this many DataLoader workers")
    args = parse_args(parser, argv)
    name = " with L_gen" if args.gen else ""
    with tempfile.TemporaryDirectory() as folder:
        target = generation_target_folder(Path(folder)) if args.gen else None
        for batch, batches in zip(args.batch, args.batches, strict=True):
            images = batch * batches
            baseline_epoch = baseline(batch, batches, target, name)
            # Epoch 0 of each Lightning run includes warm-up (and, cached, the cache filling): compare the later epochs.
            variants = [(False, 0)] + [(True, 0)] * args.compile + [(args.compile, args.workers)] * bool(args.workers)
            for compile, workers in variants:
                cached = run(True, batch, batches, args.epochs, target, compile, workers)
                cached_epoch = min(cached[1:])
                how = (" compiled" if compile else "") + (f", reads in {workers} loader workers" if workers else "")
                report("stage2", f"project cached embeddings{name}{how} B={batch}",
                       epoch_seconds=cached, images_per_epoch=images, images_per_sec=images / cached_epoch,
                       first_epoch_fills_cache_s=cached[0], ratio_to_baseline=baseline_epoch / cached_epoch,
                       peak_mem_gib=peak_memory_gib())
            recompute = run(False, batch, batches, args.epochs, target)
            recompute_epoch = min(recompute[1:])
            report("stage2", f"project recompute frozen towers{name} B={batch}", epoch_seconds=recompute,
                   images_per_epoch=images, images_per_sec=images / recompute_epoch,
                   ratio_to_baseline=baseline_epoch / recompute_epoch, peak_mem_gib=peak_memory_gib())


if __name__ == "__main__":
    main()
