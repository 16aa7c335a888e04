"""Stage 1 (ITC) at paper shapes: frozen ViT-g/14 224px + BERT-base Causal Q-Former + text branch.

Project: the real ContrastiveModule (tokenizer stage 1) under a bf16-mixed Lightning Trainer.
Baseline (same run): plain transformers Blip2VisionModel + Blip2QFormerModel + BERT text branch,
fp32 weights under bf16 autocast, a hand-written loop. Also the ViT-g forward alone (the bound).

MFU FLOPs per image = forward FLOPs of the frozen ViT (counted once: no backward reaches it)
+ 3 x forward FLOPs of the trainable part (Q-Former queries, text branch, projections), both
counted by torch's FlopCounterMode (matmuls + attention) on the real modules.

    python bench/stage1.py --batch 256 --steps 12
"""

import argparse

import torch
import torch.nn.functional as F

from common import (
    REPO, counted_flops, cuda_time, device_name, lightning_trainer, loader, measured_bf16_peak, mfu_fields,
    peak_memory_gib, random_captions, report, reset_memory,
)

TEXT_TOKENIZER = str(REPO / "data/models/bert-tokenizer")


def make_batch_fn(batch: int):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 224, 224, generator=generator).pin_memory()
    captions = random_captions(batch, generator)
    return lambda index: {"pixel_values": pixels, "caption": captions, "key": [f"{index}-{i}" for i in range(batch)]}


def flops_per_image(module, batch_fn) -> tuple[float, float]:
    """(frozen ViT forward FLOPs, trainable-part forward FLOPs) per image."""
    sample = batch_fn(0)
    pixels = sample["pixel_values"][:2].cuda()
    tokenizer = module.tokenizer
    text = module._tokenize(sample["caption"][:2])
    with torch.autocast("cuda", torch.bfloat16):  # grad enabled: FlopCounterMode's module tracker needs it
        vit = counted_flops(lambda: tokenizer.vision(pixels)) / 2
        image_embeds = tokenizer.vision(pixels).detach()
        trainable = counted_flops(lambda: (
            tokenizer.qformer.image_features(tokenizer.qformer(image_embeds)),
            tokenizer.qformer.text_features(tokenizer.qformer.encode_text(text["input_ids"], text["attention_mask"])),
        )) / 2
    return vit, trainable


VARIANTS = {
    "default": {},  # frozen ViT trunk held and run in bf16 (frozen_dtype auto under bf16-mixed)
    "compile": {"compile": True},
    "fp8": {"vision_fp8": True, "compile": True},
}


def project(batch: int, steps: int, warmup: int, peak: float, extra: dict, variant: str = "default") -> float:
    from seed_lightning.core.optim import OptimConfig
    from seed_lightning.core.throughput import ThroughputCallback
    from seed_lightning.tokenizer.contrastive import ContrastiveModule
    from seed_lightning.tokenizer.model import SeedTokenizerConfig

    reset_memory()
    torch._dynamo.reset()
    with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute on CPU
        module = ContrastiveModule(model=SeedTokenizerConfig(), text_tokenizer=TEXT_TOKENIZER,
                                   optim=OptimConfig(lr=3e-5, min_lr=3e-6, warmup_start_lr=3e-7), **VARIANTS[variant])
    batch_fn = make_batch_fn(batch)
    vit, trainable = flops_per_image(module, batch_fn)
    per_image = vit + 3 * trainable
    module.flops_per_sample = lambda: per_image
    meter = ThroughputCallback(peak_flops=peak, log_every_n_steps=steps, skip_first_steps=warmup)
    reset_memory()
    lightning_trainer(warmup + steps, [meter]).fit(module, loader(batch_fn, warmup + steps))
    rate = meter.history[-1]["samples_per_sec"]
    extra = {**extra, "ratio_to_baseline": rate / extra["baseline_images_per_sec"]}
    report("stage1", f"project ContrastiveModule {variant} B={batch}", batch=batch, images_per_sec=rate,
           variant=VARIANTS[variant],
           vit_fwd_gflops_per_image=vit / 1e9, trainable_fwd_gflops_per_image=trainable / 1e9,
           flops_formula="ViT fwd + 3 x (Q-Former+text+proj fwd), FlopCounterMode",
           **mfu_fields(rate * per_image, peak), peak_mem_gib=peak_memory_gib(), **extra)
    del module
    return rate


def baseline(batch: int, steps: int, warmup: int, peak: float) -> float:
    """Straightforward HF: fp32 modules, autocast bf16, no_grad ViT, AdamW (foreach), ITC loss."""
    from transformers import AutoTokenizer, Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    reset_memory()
    with torch.device("cuda"):
        vision = Blip2VisionModel(Blip2VisionConfig(image_size=224, patch_size=14, hidden_size=1408, num_hidden_layers=39,
                                                    num_attention_heads=16, intermediate_size=6144, qkv_bias=True,
                                                    layer_norm_eps=1e-6, attn_implementation="sdpa")).eval()
        vision.requires_grad_(False)
        ln_vision = torch.nn.LayerNorm(1408)
        qconfig = Blip2QFormerConfig(encoder_hidden_size=1408, use_qformer_text_input=True, attn_implementation="sdpa")
        qformer = Blip2QFormerModel(qconfig)
        text_embeddings = Blip2TextEmbeddings(qconfig)
        queries = torch.nn.Parameter(torch.randn(1, 32, 768) * 0.02)
        image_proj, text_proj = torch.nn.Linear(768, 256), torch.nn.Linear(768, 256)
        temperature = torch.nn.Parameter(torch.tensor(0.07))
    params = [*ln_vision.parameters(), *qformer.parameters(), *text_embeddings.parameters(), queries,
              *image_proj.parameters(), *text_proj.parameters(), temperature]
    optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.05)
    tokenizer = AutoTokenizer.from_pretrained(TEXT_TOKENIZER)
    sample = make_batch_fn(batch)(0)
    causal = torch.tril(torch.ones(32, 32, dtype=torch.bool, device="cuda"))[None, None]

    def step():
        pixels = sample["pixel_values"].cuda(non_blocking=True)
        text = tokenizer(sample["caption"], padding="longest", truncation=True, max_length=32, return_tensors="pt").to("cuda")
        with torch.autocast("cuda", torch.bfloat16):
            with torch.no_grad():
                image = vision(pixel_values=pixels).last_hidden_state
            image = ln_vision(image)
            q = qformer(query_embeds=queries.expand(batch, -1, -1), attention_mask=causal.expand(batch, 1, 32, 32),
                        encoder_hidden_states=image).last_hidden_state
            t = qformer(query_embeds=text_embeddings(input_ids=text["input_ids"]), query_length=0,
                        attention_mask=text["attention_mask"]).last_hidden_state
            image_features = F.normalize(image_proj(q[:, -1]), dim=-1)
            text_features = F.normalize(text_proj(t[:, 0]), dim=-1)
            logits = image_features @ text_features.t() / temperature
        targets = torch.arange(batch, device="cuda")
        loss = (F.cross_entropy(logits.float(), targets, label_smoothing=0.1)
                + F.cross_entropy(logits.t().float(), targets, label_smoothing=0.1)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = cuda_time(step, warmup=warmup, iters=steps)
    rate = batch / seconds
    report("stage1", f"baseline plain HF B={batch}", batch=batch, images_per_sec=rate, peak_mem_gib=peak_memory_gib())

    # The bound: the frozen ViT-g forward alone, bf16 weights, no autograd.
    vision = vision.to(torch.bfloat16)
    pixels = sample["pixel_values"].cuda().to(torch.bfloat16)
    with torch.no_grad():
        vit_flops = counted_flops(lambda: vision(pixel_values=pixels[:2])) / 2
        seconds = cuda_time(lambda: vision(pixel_values=pixels), warmup=2, iters=steps)
    report("stage1", f"bound: ViT-g/14 forward alone bf16 B={batch}", batch=batch, images_per_sec=batch / seconds,
           **mfu_fields(batch / seconds * vit_flops, peak))
    del vision, qformer, optimizer
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["default", "fp8"], choices=list(VARIANTS))
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = measured_bf16_peak()
    report("stage1", "bf16 matmul peak 8192^3", tflops=peak / 1e12, device=device_name())
    for batch in args.batch:
        base = baseline(batch, args.steps, args.warmup, peak)
        for variant in args.variants:
            try:
                project(batch, args.steps, args.warmup, peak, {"baseline_images_per_sec": base}, variant)
            except Exception as error:  # one failing variant must not cost the others' device time
                report("stage1", f"project {variant} B={batch}: FAILED {error!r}")


if __name__ == "__main__":
    main()
