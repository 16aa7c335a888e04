"""Where the time of the project's training steps goes, at paper shapes on one GPU.

Stage 1: component timings (frozen ViT forward in each precision the project offers, the
trainable rest of the step) and a torch.profiler table of the whole step. Stage 2: profiler table
of cached-embedding steps under the Lightning Trainer. MLLM: profiler tables of the packed project
step and the padded HF baseline step. Tables go to $BENCH_OUT/profile-*.txt.

    python bench/profile_steps.py --parts stage1 stage2 mllm [--mllm-variant packed-compile --no-mllm-baseline]
"""

import argparse
from pathlib import Path

import torch

from common import (
    ProfileSteps, cuda_time, deviation, image_caption_batches, lightning_trainer, loader, new_profiler, profiler_table,
    report, reset_memory,
)


def profile(step, name: str, steps: int = 3) -> None:
    step()
    torch.cuda.synchronize()
    with new_profiler() as profiler:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    profiler_table(profiler, name)


def stage1(batch: int) -> None:
    import stage1 as bench1

    from seed_lightning.core.fp8 import convert_linears_to_fp8
    from seed_lightning.core.optim import OptimConfig, build_optimizer
    from seed_lightning.tokenizer.contrastive import ContrastiveModule
    from seed_lightning.tokenizer.losses import contrastive_loss
    from seed_lightning.tokenizer.model import SeedTokenizerConfig

    reset_memory()
    with torch.device("cuda"):
        module = ContrastiveModule(model=SeedTokenizerConfig(), text_tokenizer=bench1.TEXT_TOKENIZER)
    module.to("cuda").train()  # sets the LightningModule's device, which _tokenize uses
    optimizer = build_optimizer(module, OptimConfig())
    sample = image_caption_batches(batch)(0)
    pixels = sample["pixel_values"].cuda()
    sample = {**sample, "pixel_values": pixels}
    vision = module.tokenizer.vision
    qformer = module.tokenizer.qformer

    def vit():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            return vision(pixels)

    def trunk():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            return vision.model.encoder(inputs_embeds=vision.model.embeddings(pixels)).last_hidden_state

    hidden = trunk()

    def rest():  # everything of the step after the frozen trunk
        with torch.autocast("cuda", torch.bfloat16):
            causal = qformer(vision.ln_vision(hidden))
            text_hidden = qformer.encode_text(*module._tokenize(sample["caption"]))
            loss = contrastive_loss(qformer.image_features(causal), qformer.text_features(text_hidden), module.temperature)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def full():
        with torch.autocast("cuda", torch.bfloat16):
            image, text = module._features(sample)
            loss = contrastive_loss(image, text, module.temperature)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(name, fn, iters=5, **fields):
        seconds = cuda_time(fn, warmup=2, iters=iters)
        report("profile-stage1", name, batch=batch, ms_per_step=seconds * 1e3, images_per_sec=batch / seconds, **fields)

    timed("ViT fwd, fp32 weights under autocast (as trained so far)", vit)
    timed("rest of step (ln_vision, Q-Former, text, loss, bwd, AdamW)", rest)
    timed("full step, fp32 frozen weights", full)
    profile(rest, "stage1-rest")
    reference = vit()

    vision.model.embeddings.to(torch.bfloat16)
    vision.model.encoder.to(torch.bfloat16)
    timed("ViT fwd, bf16 frozen weights", vit, **deviation(vit(), reference, "tokens_vs_fp32_weights"))
    timed("full step, bf16 frozen weights", full)
    profile(vit, "stage1-vit-bf16", steps=2)
    convert_linears_to_fp8(vision)
    timed("ViT fwd, fp8 eager", vit, iters=3, **deviation(vit(), reference, "tokens_vs_fp32_weights"))
    vision.model.encoder.compile()
    timed("ViT fwd, fp8 compiled", vit, **deviation(vit(), reference, "tokens_vs_fp32_weights"))
    timed("full step, fp8 compiled ViT", full)
    profile(vit, "stage1-vit-fp8-compiled", steps=2)


def stage2(batch: int, batches: int) -> None:
    import tempfile

    import stage2 as bench2

    from seed_lightning.tokenizer.codebook import CodebookModule
    from seed_lightning.tokenizer.model import SeedTokenizerConfig

    reset_memory()
    make = image_caption_batches(batch)
    with tempfile.TemporaryDirectory() as cache_dir:
        with torch.device("cuda"):
            module = CodebookModule(model=SeedTokenizerConfig(), text_tokenizer=bench2.TEXT_TOKENIZER, cache_dir=cache_dir)
        timer = bench2.EpochTimer()
        lightning_trainer(-1, [timer, ProfileSteps(2 * batches + 2, 4, "stage2-cached")], max_epochs=3).fit(module, loader(make, batches))
    report("profile-stage2", "cached epochs (last one profiled)", epoch_seconds=timer.seconds, batches=batches, batch=batch)


def mllm(samples: int, variant: str, baseline: bool) -> None:
    import tempfile

    import mllm as bench3
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = bench3.random_opt_folder(Path(tmp))
        words = bench3.single_token_words(AutoTokenizer.from_pretrained(folder))
        batches = bench3.make_batches(words, samples, 2)
        if baseline:
            bench3.baseline(folder, batches, steps=3, warmup=2, peak=800e12, profile=profile)
        bench3.project(folder, batches, steps=4, warmup=4, peak=800e12, max_length=256, variant=variant, baseline_rate=1.0,
                       callbacks=[ProfileSteps(5, 2, f"mllm-{variant}")])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["stage1", "stage2", "mllm"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--mllm-variant", default="packed")
    parser.add_argument("--no-mllm-baseline", action="store_true")
    args = parser.parse_args()
    for part in args.parts:
        try:
            parts = {
                "stage1": lambda: stage1(args.batch),
                "stage2": lambda: stage2(args.batch, 12),
                "mllm": lambda: mllm(256, args.mllm_variant, not args.no_mllm_baseline),
            }
            parts[part]()
        except Exception as error:  # one failing part must not cost the others' device time
            import traceback

            traceback.print_exc()
            print(f"FAILED {part}: {error!r}", flush=True)


if __name__ == "__main__":
    main()
