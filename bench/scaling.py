"""Stage-1 DDP scaling: the real TokenizerModule (ViT-g/14 + BERT-base Causal Q-Former, ITC with
negatives gathered from every rank) under a bf16-mixed DDP Trainer on 1..N GPUs of one host.

Each rank trains on its own batch of `--batch` images; scaling efficiency at N GPUs = per-GPU images/s
at N over per-GPU images/s at 1 (same machine, same run of this script).

    python bench/stage1_ddp.py --devices 1 2 4 --batch 128 --steps 10 [--comm-hook bf16]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from common import REPO, loader, random_captions

TEXT_TOKENIZER = str(REPO / "data/models/bert-tokenizer")


class StepTimer:
    """Wall time of the steps after `warmup`, synchronised, measured on every rank."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.steps += 1

    def on_train_end(self, trainer, *args):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def ddp_strategy(devices: int, comm_hook: str):
    """Plain DDP, or DDP whose gradient all-reduce runs in bf16 (half the bytes on the wire)."""
    if devices == 1:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if comm_hook == "bf16":
        return DDPStrategy(ddp_comm_hook=default_hooks.bf16_compress_hook, gradient_as_bucket_view=True)
    return DDPStrategy()


def worker(devices: int, batch: int, steps: int, warmup: int, comm_hook: str) -> None:
    """Runs inside the Lightning DDP launch: every rank executes this."""
    import lightning as L

    from seed_lightning.models.tokenizer import SeedTokenizerConfig
    from seed_lightning.training.optim import OptimConfig
    from seed_lightning.training.tokenizer_module import TokenizerModule

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    with torch.device(f"cuda:{local_rank}"):  # random init on this rank's GPU
        module = TokenizerModule(SeedTokenizerConfig(), TEXT_TOKENIZER, stage="contrastive",
                                 optim=OptimConfig(lr=3e-5, min_lr=3e-6, warmup_start_lr=3e-7))
    generator = torch.Generator().manual_seed(local_rank)
    pixels = torch.randn(batch, 3, 224, 224, generator=generator).pin_memory()
    captions = random_captions(batch, generator)

    def make(index):
        return {"pixel_values": pixels, "caption": captions, "key": [f"{index}-{i}" for i in range(batch)]}

    timer = type("Timer", (StepTimer, L.Callback), {})(warmup)
    trainer = L.Trainer(accelerator="gpu", devices=devices, strategy=ddp_strategy(devices, comm_hook),
                        precision="bf16-mixed", max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer], use_distributed_sampler=False)
    trainer.fit(module, loader(make, warmup + steps + 2))
    if trainer.is_global_zero:
        per_gpu = batch * timer.steps / timer.seconds
        print("RESULT " + json.dumps({"bench": "stage1_ddp", "devices": devices, "batch_per_gpu": batch, "comm_hook": comm_hook,
                                      "images_per_sec_per_gpu": per_gpu, "images_per_sec_total": per_gpu * devices,
                                      "device": torch.cuda.get_device_name()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--comm-hook", choices=["none", "bf16"], default="none")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.batch, args.steps, args.warmup, args.comm_hook)
        return
    rates = {}
    for devices in args.devices:
        # One fresh process per world size: Lightning's DDP launcher re-runs this command on every rank.
        command = [sys.executable, __file__, "--worker", str(devices), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--comm-hook", args.comm_hook]
        result = subprocess.run(command, capture_output=True, text=True)
        for line in result.stdout.splitlines():
            if line.startswith("RESULT "):
                print(line, flush=True)
                rates[devices] = json.loads(line[7:])["images_per_sec_per_gpu"]
        if devices not in rates:
            print(f"FAILED {devices} GPUs:\n{result.stderr[-3000:]}", flush=True)
    if 1 in rates:
        for devices, rate in sorted(rates.items()):
            print(f"SCALING {devices} GPU: {rate:.0f} img/s/GPU, efficiency {rate / rates[1]:.1%}", flush=True)


if __name__ == "__main__":
    main()
