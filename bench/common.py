"""Shared helpers of the GPU benchmarks: device peak, timing, FLOP counting, result records.

Every benchmark prints one JSON line per measurement (prefixed `RESULT `) and appends it to
$BENCH_OUT/results.jsonl when BENCH_OUT is set, so RESULTS.md can be filled from one file.

The benches run at the paper's shapes on the GPU (`SCALE`); `use_tiny()` (a bench's `--tiny`) switches them to the
tiny local models on the CPU, so that tests/bench smoke-runs every code path a GPU call would take.
"""

import datetime
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# The benches run from a checkout: make `seed_lightning` importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seed_lightning.core.throughput import linear_flops_per_token  # noqa: E402, F401  (bench/mllm.py uses it)

DATASHEET_BF16_PEAK = 989e12
"""H100/H200 SXM dense bf16 FLOP/s from NVIDIA's datasheet."""
DATE = datetime.date.today().isoformat()
REPO = Path(__file__).resolve().parents[1]


VIT_G_14 = {"image_size": 224, "patch_size": 14, "hidden_size": 1408, "num_hidden_layers": 39, "num_attention_heads": 16,
            "intermediate_size": 6144, "qkv_bias": True, "layer_norm_eps": 1e-6, "initializer_range": 0.02}
"""BLIP-2's EVA ViT-g/14 at 224 px, as Blip2VisionConfig arguments (the tokenizer's default VisionEncoderConfig)."""
NUM_QUERIES = 32
TINY_BLIP2 = REPO / "data/models/tiny-blip2"

SCALE = SimpleNamespace(
    device=torch.device("cuda"),
    vision=VIT_G_14,
    qformer={},  # BERT-base, Blip2QFormerConfig's defaults
    tokenizer_model={},  # SeedTokenizerConfig's defaults: the paper's tokenizer, random weights
    image_size=224,
    dims="full",  # of bench/rehearsal/hub_cache.py's random hub models (the SD text encoder of stage 2)
)
"""Where and at what size the benches run: the paper's shapes on the GPU unless `use_tiny()` was called."""


def use_tiny() -> None:
    """Run the benches on the CPU with data/models/tiny-blip2's dims (64 px images): a smoke test, not a measurement."""
    config = json.loads((TINY_BLIP2 / "config.json").read_text())
    qformer = {key: config["qformer_config"][key]
               for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    vars(SCALE).update(
        device=torch.device("cpu"),
        vision={key: value for key, value in config["vision_config"].items() if key != "model_type"},
        qformer=qformer,
        tokenizer_model={"vision": {"pretrained": str(TINY_BLIP2)}, "qformer": {"pretrained": str(TINY_BLIP2)},
                         "num_codes": 1024, "recon_head": {"depth": 2, "num_heads": 4},
                         "gen_head": {"depth": 2, "num_heads": 4, "qformer_layers": 2}},
        image_size=config["vision_config"]["image_size"],
        dims="tiny",
    )


def parse_args(parser, argv: list[str] | None):
    """`parser`'s arguments and `--tiny`, which switches to `use_tiny()` (the form tests/bench runs)."""
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    if args.tiny:
        use_tiny()
    return args


def on_gpu() -> bool:
    return SCALE.device.type == "cuda"


def synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def measured_bf16_peak(size: int = 8192, iters: int = 20) -> float:
    """bf16 FLOP/s of one large random matmul on this card: the practical MFU ceiling (the datasheet's on the CPU,
    where MFU fields mean nothing)."""
    if not on_gpu():
        return DATASHEET_BF16_PEAK
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    seconds = cuda_time(lambda: a @ b, warmup=3, iters=iters)
    return 2 * size**3 / seconds


def cuda_time(step: Callable[[], object], warmup: int, iters: int) -> float:
    """Mean seconds per call of `step` after `warmup` calls, with the device synchronised around the loop."""
    for _ in range(warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize()
    return (time.perf_counter() - start) / iters


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls/convolutions/attention that `fn` runs (torch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def mfu_fields(flops_per_sec: float, peak: float) -> dict[str, float]:
    return {
        "model_tflops": flops_per_sec / 1e12,
        "mfu_measured_peak": flops_per_sec / peak,
        "mfu_datasheet_989": flops_per_sec / DATASHEET_BF16_PEAK,
    }


def deviation(out: torch.Tensor, reference: torch.Tensor, name: str) -> dict[str, float]:
    """How far `out` [..., D] is from `reference`: relative L2 of the whole tensor, min and mean cosine of its rows."""
    out, reference = out.float(), reference.float()
    cosine = torch.nn.functional.cosine_similarity(out, reference, dim=-1)
    return {f"{name}_rel_l2": float((out - reference).norm() / reference.norm()),
            f"{name}_min_cos": float(cosine.min()), f"{name}_mean_cos": float(cosine.mean())}


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if on_gpu() else 0.0


def reset_memory() -> None:
    import gc

    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def profiler_table(profiler, name: str, rows: int = 25) -> None:
    """Write a torch.profiler's op table (by device and by host time) to $BENCH_OUT/profile-NAME.txt; print the top."""
    out = Path(os.environ.get("BENCH_OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    averages = profiler.key_averages()
    text = [f"## sorted by {key}\n" + averages.table(sort_by=key, row_limit=rows, max_name_column_width=70)
            for key in ("self_cuda_time_total", "self_cpu_time_total")]
    (out / f"profile-{name}.txt").write_text("\n".join(text))
    print(f"==== {name} (top by device time)\n"
          + averages.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50), flush=True)


def new_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


class ProfileSteps(L.Callback):
    """torch.profiler over the training steps [first, first + count); the table is written when they end."""

    def __init__(self, first: int, count: int, name: str):
        self.first, self.count, self.name = first, count, name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first:
            torch.cuda.synchronize()
            self.profiler = new_profiler().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.first + self.count:
            torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            profiler_table(self.profiler, self.name)


def report(bench: str, name: str, **fields) -> dict:
    record = {"bench": bench, "name": name, "card": device_name(), "date": DATE, **fields}
    line = json.dumps(record, default=float)
    print("RESULT " + line, flush=True)
    out = os.environ.get("BENCH_OUT")
    if out:
        with open(Path(out) / "results.jsonl", "a") as handle:
            handle.write(line + "\n")
    return record


def lightning_trainer(steps: int, callbacks: list, max_epochs: int = -1, **options):
    """A bf16-mixed single-GPU (tiny: CPU) Trainer with every extra (logging, checkpoints, progress bar, validation)
    off; `options` are further Trainer arguments or replace these."""
    settings = dict(
        accelerator="gpu" if on_gpu() else "cpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    return L.Trainer(**{**settings, **options})


def plain_blip2_encoders(frozen_dtype: torch.dtype) -> SimpleNamespace:
    """SEED's image encoder as plain transformers parts at `SCALE`'s shapes, random weights, on its device, SDPA: `vision`
    the ViT-g/14 (frozen, eval, held in `frozen_dtype` as `from_pretrained(torch_dtype=...)` would load it),
    `ln_vision`, `qformer` the BERT-base Q-Former with cross-attention to the ViT (`qformer_config`), `queries`
    the 32 learned queries, `causal_mask` their lower-triangular self-attention mask [1, 1, Q, Q]. All but
    `vision` are fp32 and trainable; a caller that freezes them casts them itself."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

    with SCALE.device:
        vision = Blip2VisionModel(Blip2VisionConfig(**SCALE.vision, attn_implementation="sdpa")).eval()
        qformer_config = Blip2QFormerConfig(**SCALE.qformer, encoder_hidden_size=SCALE.vision["hidden_size"],
                                            use_qformer_text_input=True, attn_implementation="sdpa")
        return SimpleNamespace(
            vision=vision.requires_grad_(False).to(frozen_dtype),
            ln_vision=nn.LayerNorm(SCALE.vision["hidden_size"]),
            qformer=Blip2QFormerModel(qformer_config),
            qformer_config=qformer_config,
            queries=nn.Parameter(torch.randn(1, NUM_QUERIES, qformer_config.hidden_size) * 0.02),
            causal_mask=torch.tril(torch.ones(NUM_QUERIES, NUM_QUERIES, dtype=torch.bool))[None, None],
        )


def plain_vit_tokens(vision: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen ViT's output tokens, run the plain way for the dtype it is held in: bf16 weights in bf16 outside
    autocast (autocast would run its LayerNorms in fp32), fp32 weights under bf16 autocast."""
    with torch.no_grad():
        if vision.dtype == torch.float32:
            with torch.autocast(pixels.device.type, torch.bfloat16):
                return vision(pixel_values=pixels).last_hidden_state
        return vision(pixel_values=pixels.to(vision.dtype)).last_hidden_state


def plain_causal_queries(parts: SimpleNamespace, image: torch.Tensor) -> torch.Tensor:
    """The Q-Former's 32 causal query states [B, Q, D] over ViT tokens `image` (ln_vision applied here)."""
    batch = image.shape[0]
    return parts.qformer(query_embeds=parts.queries.expand(batch, -1, -1),
                         attention_mask=parts.causal_mask.expand(batch, 1, -1, -1),
                         encoder_hidden_states=parts.ln_vision(image)).last_hidden_state


class RepeatedBatches(torch.utils.data.Dataset):
    """`length` batches made by `make(index)`: an in-memory stand-in for the data pipeline, so the
    benches measure the training step (the pipeline is measured alone in data_pipeline.py)."""

    def __init__(self, make: Callable[[int], dict], length: int):
        self.make = make
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.make(index)


def loader(make: Callable[[int], dict], length: int) -> torch.utils.data.DataLoader:
    # batch_size=None: items are whole batches; their tensors are pre-pinned, so H2D copies are async.
    return torch.utils.data.DataLoader(RepeatedBatches(make, length), batch_size=None, num_workers=0)


def image_caption_batches(batch: int, seed: int = 0) -> Callable[[int], dict]:
    """`make(index)` -> one batch of `batch` random images of `SCALE.image_size` (pinned on the GPU), the same
    every time, and CC3M-like captions of its own (so that a cache keyed by caption sees every caption once per
    epoch, as on real data), with per-index sample keys."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, SCALE.image_size, SCALE.image_size, generator=generator)
    if on_gpu():
        pixels = pixels.pin_memory()

    @functools.cache  # made once per index: the timed epochs do not pay for them again
    def captions(index: int) -> list[str]:
        return random_captions(batch, torch.Generator().manual_seed(seed * 1_000_003 + index))

    return lambda index: {"pixel_values": pixels, "caption": captions(index), "key": [f"{index}-{i}" for i in range(batch)]}


WORDS = (
    "a man woman dog cat person group of people standing sitting next to on the in with street table "
    "red blue green white black small large old young two three field water beach city building car "
    "train bus bike tree sky grass snow riding playing holding walking looking near front top view photo"
).split()


def random_captions(count: int, generator: torch.Generator, low: int = 10, high: int = 20) -> list[str]:
    """`count` captions of `low`..`high` common words (CC3M-like length)."""
    lengths = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    picks = iter(torch.randint(len(WORDS), (sum(lengths),), generator=generator).tolist())  # two calls: ~1 ms
    return [" ".join(WORDS[next(picks)] for _ in range(length)) for length in lengths]
