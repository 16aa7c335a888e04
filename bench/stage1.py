"""Stage 1 (ITC) at paper shapes: frozen ViT-g/14 224px + BERT-base Causal Q-Former + text branch.

Project: the real ContrastiveModule (tokenizer stage 1) under a bf16-mixed Lightning Trainer, per variant
(`default`: frozen trunk in bf16; `torchao-fp8`: `vision_fp8` + `compile`, the trunk's products in FP8
through torchao). Baselines (same run, same card, same batch, same trainable set: ln_vision, Q-Former + text
branch, queries, projections, temperature in fp32 under bf16 autocast; a hand-written loop, AdamW, ITC loss):
THE baseline holds the frozen ViT in bf16 and runs it outside autocast, as a model loaded with
`torch_dtype=torch.bfloat16`; the second (`--fp32-baseline`) keeps it in fp32 under autocast. Ratios are against THE baseline.
Bounds in the same run: the plain bf16 ViT-g forward alone, and each variant's own frozen ViT forward alone
(compiled where the variant compiles). The FP8 variant also reports what FP8 changes on one batch: its ViT
output tokens and ITC image features against the same weights run in bf16.

MFU FLOPs per image = forward FLOPs of the frozen ViT (counted once: no backward reaches it)
+ 3 x forward FLOPs of the trainable part (Q-Former queries, text branch, projections), both
counted by torch's FlopCounterMode (matmuls + attention) on the real modules; FP8 rows count the same
FLOPs against the bf16 peak.

    python bench/stage1.py --batch 256 --steps 10 --variants torchao-fp8 default
    python bench/stage1.py --tiny --batch 4 --steps 1 --warmup 1   # CPU smoke test (tests/bench/test_stage1.py)
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F

from common import (
    REPO, SCALE, counted_flops, cuda_time, deviation, device_name, image_caption_batches, lightning_trainer, loader,
    measured_bf16_peak, mfu_fields, parse_args, peak_memory_gib, plain_blip2_encoders, plain_causal_queries,
    plain_vit_tokens, report, reset_memory,
)

TEXT_TOKENIZER = str(REPO / "data/models/bert-tokenizer")


def flops_per_image(module, batch_fn) -> tuple[float, float]:
    """(frozen ViT forward FLOPs, trainable-part forward FLOPs) per image."""
    sample = batch_fn(0)
    pixels = sample["pixel_values"][:2].to(SCALE.device)
    tokenizer = module.tokenizer
    text = module._tokenize(sample["caption"][:2])  # (input_ids, attention_mask)
    with torch.autocast(SCALE.device.type, torch.bfloat16):  # grad enabled: FlopCounterMode's module tracker needs it
        vit = counted_flops(lambda: tokenizer.vision(pixels)) / 2
        image_embeds = tokenizer.vision(pixels).detach()
        trainable = counted_flops(lambda: (
            tokenizer.qformer.image_features(tokenizer.qformer(image_embeds)),
            tokenizer.qformer.text_features(tokenizer.qformer.encode_text(*text)),
        )) / 2
    return vit, trainable


VARIANTS = {
    "default": {},  # frozen ViT trunk held and run in bf16 (frozen_dtype auto under bf16-mixed)
    "compile": {"compile": True},
    "torchao-fp8": {"vision_fp8": True, "compile": True},
}


class AfterTraining(L.Callback):
    """Runs `measure(module)` when training ends, while the module is still on the GPU (teardown moves it off)."""

    def __init__(self, measure):
        self.measure = measure
        self.fields: dict = {}

    def on_train_end(self, trainer, pl_module):
        self.fields = self.measure(pl_module)


def vit_alone(module, pixels: torch.Tensor, steps: int, vit_flops: float, peak: float) -> dict:
    """The module's own frozen ViT (+ ln_vision) forward alone, as the variant runs it (compiled or not)."""
    with torch.no_grad():
        seconds = cuda_time(lambda: module.tokenizer.vision(pixels), warmup=2, iters=steps)
    rate = pixels.shape[0] / seconds
    return {"vit_fwd_alone_images_per_sec": rate,
            **{f"vit_fwd_alone_{k}": v for k, v in mfu_fields(rate * vit_flops, peak).items()}}


def fp8_deviation(module, sample: dict) -> dict:
    """What FP8 changes on one batch: the variant's ViT output tokens (compiled FP8, as trained) and ITC image
    features against the same weights run in bf16 (each FP8 layer swapped for an nn.Linear on its bf16 weight,
    eager), all without dropout. The text features do not pass through the ViT, so FP8 leaves them as they are."""
    from seed_lightning.core.fp8 import Float8InferenceLinear
    from seed_lightning.core.modes import eval_mode

    vision, qformer = module.tokenizer.vision, module.tokenizer.qformer
    pixels = sample["pixel_values"].to(SCALE.device)

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        # autocast as in training_step under bf16-mixed
        with eval_mode(module.tokenizer), torch.no_grad(), torch.autocast(SCALE.device.type, torch.bfloat16):
            tokens = vision(pixels)
            return tokens, qformer.image_features(qformer(tokens))

    fp8_tokens, fp8_features = outputs()
    converted = [(parent, name, child) for parent in vision.modules() for name, child in parent.named_children()
                 if isinstance(child, Float8InferenceLinear)]
    for parent, name, child in converted:
        plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
        plain.weight, plain.bias = child.weight, child.bias
        setattr(parent, name, plain)
    try:
        with torch.compiler.set_stance("force_eager"):  # no recompilation for the swapped layers
            bf16_tokens, bf16_features = outputs()
    finally:
        for parent, name, child in converted:
            setattr(parent, name, child)
    return {"fp8_layers": len(converted), **deviation(fp8_tokens, bf16_tokens, "fp8_vs_bf16_vit_tokens"),
            **deviation(fp8_features, bf16_features, "fp8_vs_bf16_itc_image_features")}


def contrastive_module(**options):
    """The real stage-1 module at `SCALE`'s shapes (random weights, initialised on its device: seconds instead of a
    minute on the CPU at paper shapes), the paper's learning rates unless `options` set `optim`."""
    from seed_lightning.core.optim import OptimConfig
    from seed_lightning.tokenizer.contrastive import ContrastiveModule
    from seed_lightning.tokenizer.model import SeedTokenizerConfig

    options.setdefault("optim", OptimConfig(lr=3e-5, min_lr=3e-6, warmup_start_lr=3e-7))
    with SCALE.device:
        return ContrastiveModule(model=SeedTokenizerConfig.from_dict(SCALE.tokenizer_model),
                                 text_tokenizer=TEXT_TOKENIZER, **options)


def project(batch: int, steps: int, warmup: int, peak: float, baselines: dict[str, float], variant: str) -> float:
    from seed_lightning.core.throughput import ThroughputCallback

    reset_memory()
    torch._dynamo.reset()
    module = contrastive_module(**VARIANTS[variant])
    batch_fn = image_caption_batches(batch)
    vit, trainable = flops_per_image(module, batch_fn)
    per_image = vit + 3 * trainable
    module.flops_per_sample = lambda: per_image
    meter = ThroughputCallback(peak_flops=peak, log_every_n_steps=steps, skip_first_steps=warmup)
    sample = batch_fn(0)

    def measure(trained) -> dict:
        fields = vit_alone(trained, sample["pixel_values"].to(SCALE.device), steps, vit, peak)
        return {**fields, **(fp8_deviation(trained, sample) if trained.hparams.vision_fp8 else {})}

    after = AfterTraining(measure)
    reset_memory()
    lightning_trainer(warmup + steps, [meter, after]).fit(module, loader(batch_fn, warmup + steps))
    rate = meter.history[-1]["samples_per_sec"]
    report("stage1", f"project ContrastiveModule {variant} B={batch}", batch=batch, images_per_sec=rate,
           variant=VARIANTS[variant], baseline_images_per_sec=baselines["bfloat16"],
           ratio_to_baseline=rate / baselines["bfloat16"],
           **({"ratio_to_fp32_frozen_baseline": rate / baselines["float32"]} if "float32" in baselines else {}),
           vit_fwd_gflops_per_image=vit / 1e9, trainable_fwd_gflops_per_image=trainable / 1e9,
           flops_formula="ViT fwd + 3 x (Q-Former+text+proj fwd), FlopCounterMode",
           **mfu_fields(rate * per_image, peak), peak_mem_gib=peak_memory_gib(), **after.fields)
    del module
    return rate


def baseline(batch: int, steps: int, warmup: int, frozen_dtype: torch.dtype) -> float:
    """Straightforward HF: the frozen ViT held in `frozen_dtype` (see `plain_vit_tokens`), the trained parts fp32
    under bf16 autocast, AdamW (foreach), ITC loss."""
    from transformers import AutoTokenizer
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    reset_memory()
    parts = plain_blip2_encoders(frozen_dtype)
    hidden = parts.qformer_config.hidden_size
    with SCALE.device:
        text_embeddings = Blip2TextEmbeddings(parts.qformer_config)
        image_proj, text_proj = torch.nn.Linear(hidden, 256), torch.nn.Linear(hidden, 256)
        temperature = torch.nn.Parameter(torch.tensor(0.07))
    params = [*parts.ln_vision.parameters(), *parts.qformer.parameters(), *text_embeddings.parameters(), parts.queries,
              *image_proj.parameters(), *text_proj.parameters(), temperature]
    optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.05)
    tokenizer = AutoTokenizer.from_pretrained(TEXT_TOKENIZER)
    sample = image_caption_batches(batch)(0)

    def step():
        pixels = sample["pixel_values"].to(SCALE.device, non_blocking=True)
        text = tokenizer(sample["caption"], padding="longest", truncation=True, max_length=32,
                         return_tensors="pt").to(SCALE.device)
        image = plain_vit_tokens(parts.vision, pixels)
        with torch.autocast(SCALE.device.type, torch.bfloat16):
            q = plain_causal_queries(parts, image)
            t = parts.qformer(query_embeds=text_embeddings(input_ids=text["input_ids"]), query_length=0,
                              attention_mask=text["attention_mask"]).last_hidden_state
            image_features = F.normalize(image_proj(q[:, -1]), dim=-1)
            text_features = F.normalize(text_proj(t[:, 0]), dim=-1)
            logits = image_features @ text_features.t() / temperature
        targets = torch.arange(batch, device=SCALE.device)
        loss = (F.cross_entropy(logits.float(), targets, label_smoothing=0.1)
                + F.cross_entropy(logits.t().float(), targets, label_smoothing=0.1)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = cuda_time(step, warmup=warmup, iters=steps)
    rate = batch / seconds
    name = {torch.bfloat16: "THE baseline: plain HF, bf16 frozen ViT outside autocast",
            torch.float32: "baseline: plain HF, fp32 frozen ViT under autocast"}[frozen_dtype]
    report("stage1", f"{name} B={batch}", batch=batch, images_per_sec=rate, frozen_dtype=str(frozen_dtype),
           peak_mem_gib=peak_memory_gib())
    return rate


def vit_bound(batch: int, steps: int, peak: float) -> None:
    """The plain HF ViT-g forward alone, bf16 weights, no autograd: what a stage-1 step without FP8 cannot beat."""
    reset_memory()
    vision = plain_blip2_encoders(torch.bfloat16).vision
    pixels = image_caption_batches(batch)(0)["pixel_values"].to(SCALE.device, torch.bfloat16)
    with torch.no_grad():
        vit_flops = counted_flops(lambda: vision(pixel_values=pixels[:2])) / 2
        seconds = cuda_time(lambda: vision(pixel_values=pixels), warmup=2, iters=steps)
    report("stage1", f"bound: plain HF ViT-g/14 forward alone bf16 B={batch}", batch=batch,
           images_per_sec=batch / seconds, **mfu_fields(batch / seconds * vit_flops, peak))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[256])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["torchao-fp8", "default"], choices=list(VARIANTS),
                        help="in this order, after THE baseline (the most important first: a time limit cuts the last)")
    parser.add_argument("--fp32-baseline", action="store_true", help="also the baseline with fp32 frozen weights")
    parser.add_argument("--no-vit-bound", action="store_true", help="skip the plain ViT forward alone (run last)")
    args = parse_args(parser, argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = measured_bf16_peak()
    report("stage1", "bf16 matmul peak 8192^3", tflops=peak / 1e12, device=device_name())
    for batch in args.batch:
        dtypes = (torch.bfloat16, torch.float32) if args.fp32_baseline else (torch.bfloat16,)
        baselines = {str(dtype).removeprefix("torch."): baseline(batch, args.steps, args.warmup, dtype)
                     for dtype in dtypes}
        for variant in args.variants:
            try:
                project(batch, args.steps, args.warmup, peak, baselines, variant)
            except Exception as error:  # one failing variant must not cost the others' device time
                report("stage1", f"project {variant} B={batch}: FAILED {error!r}")
        if not args.no_vit_bound:
            vit_bound(batch, args.steps, peak)


if __name__ == "__main__":
    main()
