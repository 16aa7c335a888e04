"""Caption metrics on validation (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D), plus the rank-0 scoring helpers
shared by the evaluation callbacks.

Every evaluation callback follows one pattern so that DDP gives the same numbers as one process:
each rank keeps ``{val index: prediction}``; at epoch end the dicts of all ranks are gathered and
merged by index (sampler padding never counts twice), rank 0 scores and writes result files, and the
metrics are broadcast so that every rank logs the same values.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from seed_lightning.errors import ConfigError
from seed_lightning.metrics.captions import check_java, score_captions, write_coco_results
from seed_lightning.metrics.gather import gather_objects, merge_by_index

T = TypeVar("T")

CAPTION_METRIC_NAMES = {"Bleu_1": "BLEU_1", "Bleu_2": "BLEU_2", "Bleu_3": "BLEU_3", "Bleu_4": "BLEU_4",
                        "METEOR": "METEOR", "ROUGE_L": "ROUGE_L", "CIDEr": "CIDEr"}
"""pycocoevalcap's score names -> the names logged under val/."""


# ---- helpers shared by the evaluation callbacks ----------------------------------------------------
def results_dir(trainer: L.Trainer) -> Path:
    """Where result files go: the logger's run folder, else the trainer's default_root_dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def evaluates_now(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """True for trainer.validate, and in fit for every `every_n_epochs`-th epoch (never in the sanity check)."""
    if trainer.sanity_checking:
        return False
    return trainer.state.fn == TrainerFn.VALIDATING or (trainer.current_epoch + 1) % every_n_epochs == 0


def merge_ranks(outputs: Mapping[int, T]) -> dict[int, T]:
    """Every rank's ``{val index: output}`` merged into one dict (a collective: call on all ranks)."""
    return merge_by_index(gather_objects(dict(outputs)))


def publish(
    trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict[str, float] | None, prog_bar: tuple[str, ...] = ()
) -> dict[str, float]:
    """Broadcast rank 0's `metrics` and log them on every rank (TensorBoard + progress bar for `prog_bar`)."""
    metrics = trainer.strategy.broadcast(metrics, src=0) or {}
    for name, value in metrics.items():
        pl_module.log(name, float(value), prog_bar=name in prog_bar, rank_zero_only=False)
    return metrics


def add_to_tensorboard(trainer: L.Trainer, kind: str, tag: str, value: Any) -> None:
    """`experiment.add_text` / `add_image` on every logger that has it (rank 0 only: loggers write there)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        writer = getattr(getattr(logger, "experiment", None), f"add_{kind}", None)
        if writer is not None:
            writer(tag, value, global_step=trainer.global_step)


def require_attribute(pl_module: L.LightningModule, name: str, callback: str) -> Any:
    module = getattr(pl_module, name, None)
    if module is None:
        raise ConfigError(f"{callback} needs a LightningModule with a `.{name}` attribute; "
                          f"{type(pl_module).__name__} has none: remove the callback from this config")
    return module


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


# ---- the callback ---------------------------------------------------------------------------------
class CaptionMetricsCallback(L.Callback):
    """Captions the val images of an MLLM module (``pl_module.mllm.caption`` on ``batch["codes"]``) and
    scores them against each image's references (``meta["captions"]``) with pycocoevalcap.

    Logs val/CIDEr (CIDEr-D), val/BLEU_1..4, val/ROUGE_L (+ val/METEOR) as pycocoevalcap's fractions
    (papers print x100), writes ``captions_epoch{N}.json`` (COCO results format) into the run folder and
    a few sample captions as TensorBoard text.
    """

    def __init__(
        self,
        num_beams: int = 1,
        max_new_tokens: int = 30,
        meteor: bool = False,
        every_n_epochs: int = 1,
        max_images: int | None = None,
        num_logged_samples: int = 8,
    ) -> None:
        """
        Args:
            num_beams: Beam width of caption generation (1 = greedy).
            max_new_tokens: Longest caption generated, in LM tokens.
            meteor: Also compute METEOR (starts a JVM: ~10 s per evaluation).
            every_n_epochs: Evaluate after every n-th training epoch (trainer.validate always evaluates).
            max_images: Caption only the first this many val images (None: all).
            num_logged_samples: Predicted captions (with a reference) shown as TensorBoard text.
        """
        super().__init__()
        check_positive(num_beams=num_beams, max_new_tokens=max_new_tokens, every_n_epochs=every_n_epochs,
                       max_images=max_images)
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.meteor = meteor
        self.every_n_epochs = every_n_epochs
        self.max_images = max_images
        self.num_logged_samples = num_logged_samples
        self._outputs: dict[int, dict[str, Any]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_java()  # before training starts, not at the first validation
        require_attribute(pl_module, "mllm", type(self).__name__)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outputs = {}

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not evaluates_now(trainer, self.every_n_epochs):
            return
        indices = batch["index"].tolist()
        rows = [row for row, index in enumerate(indices) if self.max_images is None or index < self.max_images]
        if not rows:
            return
        captions = pl_module.mllm.caption(
            batch["codes"][rows], max_new_tokens=self.max_new_tokens, num_beams=self.num_beams
        )
        for row, caption in zip(rows, captions, strict=True):
            meta = batch["meta"][row]
            self._outputs[indices[row]] = {
                "image_id": meta.get("image_id", batch["key"][row]),
                "caption": caption,
                "references": list(meta.get("captions") or [batch["caption"][row]]),
            }

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not evaluates_now(trainer, self.every_n_epochs):
            return
        merged = merge_ranks(self._outputs)
        self._outputs = {}
        metrics = None
        if trainer.is_global_zero and merged:
            metrics = self.score(merged.values(), results_dir(trainer) / f"captions_epoch{trainer.current_epoch}.json")
            samples = list(merged.values())[: self.num_logged_samples]
            table = "\n".join(["| image | prediction | a reference |", "| --- | --- | --- |"] + [
                f"| {row['image_id']} | {row['caption']} | {row['references'][0]} |" for row in samples
            ])
            add_to_tensorboard(trainer, "text", "val/captions", table)
        publish(trainer, pl_module, metrics, prog_bar=("val/CIDEr", "val/BLEU_4"))

    def score(self, rows, results_path: Path) -> dict[str, float]:
        """Score merged rows ({image_id, caption, references}); an image met twice keeps its first caption."""
        predictions: dict[Any, str] = {}
        references: dict[Any, list[str]] = {}
        for row in rows:
            predictions.setdefault(row["image_id"], row["caption"])
            references.setdefault(row["image_id"], row["references"])
        scores = score_captions(predictions, references, meteor=self.meteor)
        write_coco_results(results_path, predictions)
        return {f"val/{CAPTION_METRIC_NAMES[name]}": value for name, value in scores.items()}
