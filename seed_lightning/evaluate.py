"""The `evaluate` subcommand: a checkpoint scored by the validation callbacks of its config, outside training.

    seed-lightning tokenizer evaluate -c conf/tokenizer/tiny.yaml -c conf/tokenizer/tiny-codebook.yaml --ckpt_path CKPT
    seed-lightning mllm evaluate -c conf/mllm/tiny.yaml --ckpt_path CKPT [--out results.json] [--trainer.devices 2]

The LightningModule, ShardDataModule and Trainer (with its configured callbacks: caption metrics, VQA accuracy,
CLIP score, ...) are built from the YAML exactly as for `fit`; `trainer.validate` runs on the checkpoint, and a
(metric, value) table is printed and written as JSON (default: results.json beside the checkpoint).
"""

from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.io import write_json_atomic


NO_CHECKPOINT_TO_EVALUATE = "evaluate needs --ckpt_path: a checkpoint file, or 'last' for the run's newest one"


class SeedTrainer(Trainer):
    """Lightning's Trainer (same arguments) with one more entry point, `evaluate`."""

    def evaluate(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        out: str | None = None,
    ) -> dict[str, float]:
        """Validate a checkpoint with the configured callbacks; print the metrics as a table and write them as JSON.

        Args:
            model: the LightningModule whose weights the checkpoint holds.
            datamodule: the data module whose val set is scored.
            ckpt_path: the checkpoint to evaluate: a file, or "last" (the newest last.ckpt of the run's checkpoints).
            out: the results JSON; default: results.json beside the checkpoint.
        """
        if ckpt_path is None:
            raise ConfigError(NO_CHECKPOINT_TO_EVALUATE)
        results = self.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        metrics = {name: float(value) for result in results for name, value in sorted(result.items())}
        if self.is_global_zero:
            print(format_table(metrics))
            out_path = Path(out) if out is not None else Path(ckpt_path).parent / "results.json"
            write_json_atomic(out_path, {"checkpoint": str(ckpt_path), "metrics": metrics})
            print(f"results written to {out_path}")
        return metrics


def format_table(metrics: dict[str, float]) -> str:
    """Two aligned columns, metric and value, one metric per line."""
    width = max([len("metric"), *(len(name) for name in metrics)])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in metrics.items()]
    return "\n".join(lines)
