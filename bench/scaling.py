"""Multi-GPU scaling on 1..N GPUs of one host, bf16-mixed, the project's real LightningModules:
- `--model stage1`: ContrastiveModule (tokenizer stage 1) (ViT-g/14 + BERT-base Causal Q-Former, ITC with negatives
  gathered from every rank) under DDP; `--batch` images per GPU.
- `--model mllm`: MLLMModule (OPT-2.7B + LoRA r16, packed caption-length samples) under DDP or, with
  `--strategy fsdp`, FSDP (FULL_SHARD, one unit per decoder layer, as conf/trainer/fsdp.yaml); `--batch`
  samples per GPU.

Scaling efficiency at N GPUs = per-GPU samples/s at N over per-GPU samples/s at 1 (same machine, same run).

    python bench/scaling.py --model stage1 --devices 1 2 4 --batch 256 --steps 10 [--comm-hook bf16]
    python bench/scaling.py --model mllm --strategy fsdp --devices 1 2 4 --batch 128 --steps 6
"""

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import REPO, image_caption_batches, loader

TEXT_TOKENIZER = str(REPO / "data/models/bert-tokenizer")


class StepTimer:
    """Wall time of the steps after `warmup`, synchronised, measured on every rank."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_start(self, trainer, *args):
        self.began = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.steps += 1

    def on_train_end(self, trainer, *args):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.total_seconds = time.perf_counter() - self.began  # with the warm-up steps (and any compilation)


def strategy_for(name: str, devices: int, comm_hook: str):
    """DDP (optionally with its gradient all-reduce in bf16), or FSDP as conf/trainer/fsdp.yaml (OPT units)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    if name == "fsdp":
        from transformers.models.opt.modeling_opt import OPTDecoderLayer

        return FSDPStrategy(auto_wrap_policy={OPTDecoderLayer}, sharding_strategy="FULL_SHARD")
    if devices == 1:
        return "auto"
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if comm_hook == "bf16":
        return DDPStrategy(ddp_comm_hook=default_hooks.bf16_compress_hook, gradient_as_bucket_view=True)
    return DDPStrategy()


def stage1_module_and_batches(batch: int, local_rank: int):
    from seed_lightning.core.optim import OptimConfig
    from seed_lightning.tokenizer.contrastive import ContrastiveModule
    from seed_lightning.tokenizer.model import SeedTokenizerConfig

    with torch.device(f"cuda:{local_rank}"):  # random init on this rank's GPU
        module = ContrastiveModule(model=SeedTokenizerConfig(), text_tokenizer=TEXT_TOKENIZER,
                                   optim=OptimConfig(lr=3e-5, min_lr=3e-6, warmup_start_lr=3e-7))
    return module, image_caption_batches(batch, seed=local_rank)


def mllm_module_and_batches(work: Path, local_rank: int, compile: bool):
    from seed_lightning.mllm.model import MultimodalLMConfig
    from seed_lightning.mllm.module import MLLMModule

    import mllm

    module = MLLMModule(MultimodalLMConfig(pretrained=str(work / "opt")), max_length=256, packing=True, compile=compile)
    rows = mllm.ready_rows(module, torch.load(work / f"batches-{local_rank % 2}.pt"), rank=local_rank)
    return module, lambda index: rows[index % len(rows)]


def worker(model: str, strategy: str, devices: int, batch: int, steps: int, warmup: int, comm_hook: str,
           work: Path, compile: bool) -> None:
    """Runs inside the Lightning launch: every rank executes this."""
    import lightning as L

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # a hung rank shows where it waits

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if model == "mllm":
        module, make = mllm_module_and_batches(work, local_rank, compile)
    else:
        module, make = stage1_module_and_batches(batch, local_rank)
    timer = type("Timer", (StepTimer, L.Callback), {})(warmup)
    trainer = L.Trainer(accelerator="gpu", devices=devices, strategy=strategy_for(strategy, devices, comm_hook),
                        precision="bf16-mixed", max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer], use_distributed_sampler=False)
    trainer.fit(module, loader(make, warmup + steps + 2))
    if trainer.is_global_zero:
        per_gpu = batch * timer.steps / timer.seconds
        print("RESULT " + json.dumps({"bench": f"scaling-{model}", "devices": devices, "batch_per_gpu": batch,
                                      "strategy": type(trainer.strategy).__name__, "comm_hook": comm_hook,
                                      "compile": compile, "seconds_incl_warmup": timer.total_seconds,
                                      "samples_per_sec_per_gpu": per_gpu, "samples_per_sec_total": per_gpu * devices,
                                      "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                                      "device": torch.cuda.get_device_name()}), flush=True)


def prepare_mllm(work: Path, batch: int) -> None:
    """The random OPT-2.7B folder and two sets of caption batches (one per rank parity), made once."""
    from transformers import AutoTokenizer

    import mllm

    mllm.random_opt_folder(work / "opt")
    words = mllm.single_token_words(AutoTokenizer.from_pretrained(work / "opt"))
    for parity in (0, 1):
        torch.save(mllm.make_batches(words, batch, 4, seed=parity), work / f"batches-{parity}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["stage1", "mllm"], default="stage1")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="fsdp: mllm only")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--comm-hook", choices=["none", "bf16"], default="none")
    parser.add_argument("--compile", action="store_true", help="mllm: compile each decoder layer (module compile=True)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per world size before it counts as hung")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.model, args.strategy, args.worker, args.batch, args.steps, args.warmup, args.comm_hook, args.work,
               args.compile)
        return
    if args.strategy == "fsdp" and args.model != "mllm":
        parser.error("--strategy fsdp is for --model mllm")
    rates = {}
    work = Path(tempfile.mkdtemp())
    if args.model == "mllm":
        prepare_mllm(work, args.batch)
    for devices in args.devices:
        # One fresh process per world size: Lightning's launcher re-runs this command on every rank.
        command = [sys.executable, __file__, "--model", args.model, "--strategy", args.strategy,
                   "--worker", str(devices), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--comm-hook", args.comm_hook, "--work", str(work)]
        command += ["--compile"] if args.compile else []
        # A session of its own, so that a hung run's other ranks (Lightning's children) can be killed with it.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGUSR2)  # every rank prints its stacks (faulthandler) before the kill
            time.sleep(5)
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            print(f"HUNG {devices} GPUs: no result after {args.timeout:.0f} s\n{stderr[-6000:]}", flush=True)
            continue
        result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        for line in result.stdout.splitlines():
            if line.startswith("RESULT "):
                print(line, flush=True)
                rates[devices] = json.loads(line[7:])["samples_per_sec_per_gpu"]
        if devices not in rates:
            print(f"FAILED {devices} GPUs:\n{result.stderr[-3000:]}", flush=True)
    if 1 in rates:
        for devices, rate in sorted(rates.items()):
            print(f"SCALING {args.model} {devices} GPU: {rate:.0f} samples/s/GPU, efficiency {rate / rates[1]:.1%}",
                  flush=True)


if __name__ == "__main__":
    main()
