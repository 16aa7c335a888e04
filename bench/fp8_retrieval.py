"""What FP8 for the frozen ViT changes on retrieval: one trained stage-1 model, its val set evaluated with the ViT
in bf16 and in torchao float8.

The real ContrastiveModule at paper shapes (ViT-g/14 with random weights, frozen in bf16; BERT-base Q-Former) trains
its Q-Former/ITC part for `--train-seconds` on the project's synthetic shards (captions that describe coloured
shapes; images resized to 224 px) under a bf16-mixed Trainer, through the project's ShardDataModule. Then the
project's own validation (val/i2t_R@K, val/t2i_R@K: `tokenizer/retrieval.py`) runs twice on the val shard with the
same trained weights: with the ViT in bf16, then with its linear layers converted to FP8 (`core/fp8.py`, eager, as
`vision_fp8` converts them). Also reported: how far the FP8 val image features are from the bf16 ones (relative
L2, mean and min cosine). Where FP8 cannot run (no torchao, no FP8 tensor cores), the FP8 half is reported as
skipped with the reason.

    python bench/fp8_retrieval.py --batch 256 --train-seconds 80
    python bench/fp8_retrieval.py --tiny --batch 8 --steps 2     # CPU smoke test (tests/bench/test_fp8_retrieval.py)
"""

import argparse

import lightning as L
import torch

from common import REPO, SCALE, deviation, lightning_trainer, parse_args, peak_memory_gib, report, reset_memory
from stage1 import contrastive_module

SHARDS = REPO / "data/synthetic/shards"
RETRIEVAL = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "mean_R")


class ValImageFeatures(L.Callback):
    """The val images' ITC features of the last validation, in val order (read before the module clears them)."""

    def __init__(self):
        self.features: torch.Tensor | None = None

    def on_validation_epoch_end(self, trainer, pl_module):
        rows = pl_module._val_outputs
        self.features = torch.stack([rows[index]["image"] for index in sorted(rows)])


def validate(module, data) -> tuple[dict[str, float], torch.Tensor]:
    """The project's val retrieval metrics and the val image features."""
    features = ValImageFeatures()
    metrics = lightning_trainer(-1, [features], limit_val_batches=1.0).validate(module, datamodule=data, verbose=False)[0]
    return {name: metrics[f"val/{name}"] for name in RETRIEVAL}, features.features


def main(argv: list[str] | None = None) -> None:
    from seed_lightning.core.data.datamodule import ShardDataModule, ShardSource
    from seed_lightning.core.errors import ConfigError
    from seed_lightning.core.fp8 import convert_linears_to_fp8, require_fp8_support
    from seed_lightning.core.optim import OptimConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--train-seconds", type=float, default=80, help="training time (Lightning's max_time)")
    parser.add_argument("--steps", type=int, default=2000, help="at most this many steps (also the cosine's length)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers")
    args = parse_args(parser, argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    reset_memory()
    module = contrastive_module(optim=OptimConfig(lr=args.lr, min_lr=args.lr / 10, warmup_start_lr=args.lr / 100,
                                                  warmup_steps=min(20, args.steps // 4)))
    data = ShardDataModule(train=[ShardSource(urls=str(SHARDS / "train-{000000..000003}.tar"))],
                           val=str(SHARDS / "val-000000.tar"), image_size=SCALE.image_size, batch_size=args.batch,
                           num_workers=args.workers, samples_per_epoch=4000)
    trainer = lightning_trainer(args.steps, [], max_time={"seconds": args.train_seconds})
    trainer.fit(module, datamodule=data)
    trained = {"train_steps": trainer.global_step, "train_seconds": args.train_seconds, "batch": args.batch,
               "train_loss": float(trainer.callback_metrics["train/loss"]), "peak_mem_gib": peak_memory_gib()}

    bf16, bf16_features = validate(module, data)
    val_images = len(bf16_features)
    report("fp8_retrieval", "val retrieval, frozen ViT bf16", **bf16, val_images=val_images, **trained)
    try:
        require_fp8_support(SCALE.device, "the FP8 half of fp8_retrieval")
    except ConfigError as error:
        report("fp8_retrieval", f"val retrieval, frozen ViT FP8: SKIPPED ({error})")
        return
    layers = convert_linears_to_fp8(module.tokenizer.vision)
    fp8, fp8_features = validate(module, data)
    report("fp8_retrieval", "val retrieval, frozen ViT torchao float8 (eager), same trained weights", **fp8,
           fp8_layers=layers, val_images=val_images,
           **{f"{name}_minus_bf16": fp8[name] - bf16[name] for name in RETRIEVAL},
           **deviation(fp8_features, bf16_features, "fp8_vs_bf16_val_image_features"))


if __name__ == "__main__":
    main()
