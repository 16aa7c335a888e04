"""MLLM at paper shapes: OPT-2.7B (random weights) + 8192 visual tokens + LoRA r16, caption-length samples.

Samples: 10-20 words (13-26 BPE tokens at GPT-2's ~1.3 tokens/word) + <img> 32 codes </img> + BOS/EOS.
Project: the real MLLMModule (packed rows, block-diagonal causal mask, per-sample positions) under a
bf16-mixed Lightning Trainer, fed rows that its RowBuilder made before timing (in training the DataLoader
workers build them while the GPU steps). THE baseline (same run, same samples, same trainable set): what a
careful user writes with plain transformers + peft: OPTForCausalLM loaded in bf16 (frozen weights stay bf16,
the trained ones - LoRA, embeddings/head, LayerNorms - in fp32), SDPA, one sample per row padded to the
longest, 2D padding mask, autocast bf16, fused AdamW. A second baseline row loads the model in fp32.

Useful tokens = non-pad tokens. MFU FLOPs per useful token = sum over every nn.Linear of 6 x params
(trainable: LoRA adapters, LM head) or 4 x params (frozen, gradient passes through); embedding lookups
and attention scores not counted (< 2% at these lengths).

    python bench/mllm.py --samples 256 --steps 8
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from common import (
    REPO, cuda_time, device_name, lightning_trainer, linear_flops_per_token, loader, measured_bf16_peak, mfu_fields,
    peak_memory_gib, report, reset_memory,
)

TOKENIZER = str(REPO / "data/models/tiny-opt")
OPT_2_7B = dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240, word_embed_proj_dim=2560,
                max_position_embeddings=2048, do_layer_norm_before=True, dropout=0.1, attention_dropout=0.0,
                activation_function="relu", enable_bias=True, tie_word_embeddings=True, pad_token_id=1,
                bos_token_id=2, eos_token_id=2)
VOCAB = 58496  # OPT's 50272 + 8194 visual/marker tokens, rounded up to a multiple of 64


def random_opt_folder(directory: Path) -> str:
    """OPT-2.7B with random weights (bf16 on disk) + the tiny BPE tokenizer, saved with save_pretrained."""
    from transformers import OPTConfig, OPTForCausalLM

    with torch.device("cuda"):
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, dtype="bfloat16", **OPT_2_7B)).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((Path(TOKENIZER) / name).read_bytes())
    return str(directory)


def single_token_words(tokenizer) -> list[str]:
    """Vocabulary entries that are one token with and without a leading space (caption length = word count)."""
    words = []
    for token in tokenizer.get_vocab():
        word = tokenizer.convert_tokens_to_string([token]).strip()
        if word.isalpha() and len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1 \
                and len(tokenizer(word, add_special_tokens=False).input_ids) == 1:
            words.append(word)
    return words


def make_batches(words: list[str], samples: int, count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        captions = [" ".join(rng.choice(words) for _ in range(rng.randint(13, 26))) for _ in range(samples)]
        codes = torch.randint(8192, (samples, 32), generator=torch.Generator().manual_seed(1000 * seed + len(batches)))
        batches.append({"codes": codes, "caption": captions, "meta": [{} for _ in range(samples)],
                        "key": [str(i) for i in range(samples)]})
    return batches


VARIANTS = {
    "packed": {},  # frozen base weights in bf16 (frozen_dtype auto under bf16-mixed)
    "packed-fp32-frozen": {"frozen_dtype": "float32"},
    "packed-compile": {"compile": True},
    "packed-flex-compile": {"compile": True, "attn_implementation": "flex_attention"},
    "padded-compile": {"packing": False, "compile": True},
}
MODEL_OPTIONS = ("attn_implementation",)
"""Variant keys that configure MultimodalLMConfig rather than MLLMModule."""


def ready_rows(module, batches: list[dict], rank: int = 0) -> list[dict]:
    """The train batches as the DataLoader workers hand them to `training_step`: rows built by the module's
    RowBuilder (batch i as stream batch i of `rank`), pinned so that their copy to the GPU is asynchronous."""
    ready = [module.row_builder.train_batch(batch, rank, index) for index, batch in enumerate(batches)]
    return [{**batch, "rows": batch["rows"].pin_memory()} for batch in ready]


def project(folder: str, batches: list[dict], steps: int, warmup: int, peak: float, max_length: int,
            variant: str, baseline_rate: float, callbacks: tuple = ()) -> None:
    from seed_lightning.core.throughput import ThroughputCallback
    from seed_lightning.mllm.model import MultimodalLMConfig
    from seed_lightning.mllm.module import MLLMModule

    reset_memory()
    torch._dynamo.reset()
    options = {"packing": True, **VARIANTS[variant]}
    model_options = {key: options.pop(key) for key in MODEL_OPTIONS if key in options}
    module = MLLMModule(MultimodalLMConfig(pretrained=folder, **model_options), max_length=max_length, **options)
    per_token, _ = linear_flops_per_token(module.mllm.model)
    module.flops_per_token = lambda: per_token
    rows = ready_rows(module, batches)  # useful tokens per step: the module's throughput_counts (non-pad tokens)
    meter = ThroughputCallback(peak_flops=peak, log_every_n_steps=steps, skip_first_steps=warmup)
    reset_memory()
    lightning_trainer(warmup + steps, [meter, *callbacks]).fit(module, loader(lambda i: rows[i % len(rows)], warmup + steps))
    rate = meter.history[-1]["tokens_per_sec"]
    report("mllm", f"project MLLMModule {variant} L={max_length}", variant={**options, **model_options},
           useful_tokens_per_sec=rate, samples_per_step=len(batches[0]["caption"]),
           rows_shape=list(rows[-1]["rows"].input_ids.shape),
           gflops_per_token=per_token / 1e9, flops_formula="sum over nn.Linear: 6N trainable, 4N frozen",
           **mfu_fields(rate * per_token, peak), peak_mem_gib=peak_memory_gib(), ratio_to_baseline=rate / baseline_rate)
    del module


def baseline(folder: str, batches: list[dict], steps: int, warmup: int, peak: float, profile=None,
             frozen_dtype: torch.dtype = torch.bfloat16) -> float:
    import peft
    from transformers import AutoTokenizer, OPTForCausalLM

    from seed_lightning.mllm.model import LoraSettings
    from seed_lightning.mllm.packing import build_sample, pad_batch
    from seed_lightning.mllm.visual_vocab import VisualVocabulary

    reset_memory()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    visual = VisualVocabulary(8192)
    visual.add_to(tokenizer)
    model = OPTForCausalLM.from_pretrained(folder, dtype=frozen_dtype, attn_implementation="sdpa").cuda()
    lora = LoraSettings()  # the project's trainable set: LoRA on every projection, embeddings/head and LayerNorms
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save, ensure_weight_tying=True, task_type=peft.TaskType.CAUSAL_LM))
    for parameter in model.parameters():  # trained weights in fp32 (AdamW on bf16 weights loses small updates)
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, betas=(0.9, 0.95),
                                  fused=True)
    per_token, _ = linear_flops_per_token(model)
    rng = random.Random(0)
    padded = []
    for batch in batches:
        spans = visual.image_span(batch["codes"]).tolist()
        samples = [build_sample(rng.choice(["t2i", "i2t"]), tokenizer(c, add_special_tokens=False).input_ids, s,
                                tokenizer.eos_token_id, tokenizer.eos_token_id) for c, s in zip(batch["caption"], spans)]
        padded.append(pad_batch(samples, tokenizer.pad_token_id))
    state = {"i": 0}

    def step():
        rows = padded[state["i"] % len(padded)]
        state["i"] += 1
        mask = (rows.segment_ids > 0).cuda(non_blocking=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=rows.input_ids.cuda(), attention_mask=mask, labels=rows.labels.cuda()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = cuda_time(step, warmup=warmup, iters=steps)
    if profile is not None:
        profile(step, "mllm-baseline", 2)
    tokens = sum(int((p.segment_ids > 0).sum()) for p in padded) / len(padded)
    rate = tokens / seconds
    name = "bf16" if frozen_dtype == torch.bfloat16 else "fp32"
    report("mllm", f"baseline plain HF+peft, frozen weights {name}, padded-to-longest", useful_tokens_per_sec=rate,
           samples_per_step=len(batches[0]["caption"]), rows_shape=list(padded[0].input_ids.shape),
           pad_fraction=1 - tokens / padded[0].input_ids.numel(), gflops_per_token=per_token / 1e9,
           **mfu_fields(rate * per_token, peak), peak_mem_gib=peak_memory_gib())
    del model, optimizer
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-length", type=int, nargs="+", default=[256])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--fp32-baseline", action="store_true", help="also time the baseline with fp32 frozen weights")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    peak = measured_bf16_peak()
    report("mllm", "bf16 matmul peak 8192^3", tflops=peak / 1e12, device=device_name())
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_opt_folder(Path(tmp))
        words = single_token_words(AutoTokenizer.from_pretrained(folder))
        batches = make_batches(words, args.samples, 4)
        base = baseline(folder, batches, args.steps, args.warmup, peak)  # THE baseline: frozen weights in bf16
        if args.fp32_baseline:
            baseline(folder, batches, args.steps, args.warmup, peak, frozen_dtype=torch.float32)
        for max_length in args.max_length:
            for variant in args.variants:
                try:
                    project(folder, batches, args.steps, args.warmup, peak, max_length, variant, base)
                except Exception as error:  # one failing variant must not cost the others' device time
                    report("mllm", f"project {variant} L={max_length}: FAILED {error!r}")


if __name__ == "__main__":
    main()
