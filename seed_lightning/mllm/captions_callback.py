"""Caption metrics on validation (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D), scored once on rank 0
(see `seed_lightning.core.validation` for the DDP pattern)."""

from pathlib import Path
from typing import Any

import lightning as L

from seed_lightning.core.validation import (
    IndexedValidationCallback,
    add_to_tensorboard,
    check_positive,
    publish,
    require_attribute,
)
from seed_lightning.mllm.captions import check_java, score_captions, write_coco_results

CAPTION_METRIC_NAMES = {"Bleu_1": "BLEU_1", "Bleu_2": "BLEU_2", "Bleu_3": "BLEU_3", "Bleu_4": "BLEU_4",
                        "METEOR": "METEOR", "ROUGE_L": "ROUGE_L", "CIDEr": "CIDEr"}
"""pycocoevalcap's score names -> the names logged under val/."""


class CaptionMetricsCallback(IndexedValidationCallback):
    """Captions the val images of an MLLM module (``pl_module.mllm.caption`` on ``batch["codes"]``) and
    scores them against each image's references (``meta["captions"]``) with pycocoevalcap.

    Logs val/CIDEr (CIDEr-D), val/BLEU_1..4, val/ROUGE_L (+ val/METEOR) as pycocoevalcap's fractions
    (papers print x100), writes ``captions_epoch{N}.json`` (COCO results format) into the run folder and
    a few sample captions as TensorBoard text. With ``score=False`` (machines without Java) captions are
    still generated, written and shown; only the scores are skipped.
    """

    def __init__(
        self,
        num_beams: int = 1,
        max_new_tokens: int = 30,
        meteor: bool = False,
        every_n_epochs: int = 1,
        max_images: int | None = None,
        num_logged_samples: int = 8,
        score: bool = True,
    ) -> None:
        """
        Args:
            num_beams: Beam width of caption generation (1 = greedy).
            max_new_tokens: Longest caption generated, in LM tokens.
            meteor: Also compute METEOR (starts a JVM: ~10 s per evaluation).
            every_n_epochs: Evaluate after every n-th training epoch (trainer.validate always evaluates).
            max_images: Caption only the first this many val images (None: all).
            num_logged_samples: Predicted captions (with a reference) shown as TensorBoard text.
            score: Score the captions with pycocoevalcap (needs Java); false still generates, writes and
                shows them.
        """
        super().__init__(every_n_epochs)
        check_positive(num_beams=num_beams, max_new_tokens=max_new_tokens, max_images=max_images)
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.meteor = meteor
        self.max_images = max_images
        self.num_logged_samples = num_logged_samples
        self.scoring = score

    @classmethod
    def check_requirements(cls, init_args: dict[str, Any], stage: str) -> None:
        """Java, unless `score` is off (see `seed_lightning.core.preflight`)."""
        if init_args["score"]:
            check_java(f"set `score: false` in the init_args of {cls.__name__} to write captions without scores")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_requirements({"score": self.scoring}, stage)  # before training starts, not at the first validation
        require_attribute(pl_module, "mllm", type(self).__name__)

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> dict[int, dict[str, Any]]:
        indices = batch["index"].tolist()
        rows = [row for row, index in enumerate(indices) if self.max_images is None or index < self.max_images]
        if not rows:
            return {}
        captions = pl_module.mllm.caption(
            batch["codes"][rows], max_new_tokens=self.max_new_tokens, num_beams=self.num_beams
        )
        outputs = {}
        for row, caption in zip(rows, captions, strict=True):
            meta = batch["meta"][row]
            outputs[indices[row]] = {
                "image_id": meta.get("image_id", batch["key"][row]),
                "caption": caption,
                "references": list(meta.get("captions") or [batch["caption"][row]]),
            }
        return outputs

    def finish(
        self, trainer: L.Trainer, pl_module: L.LightningModule, merged: dict[int, dict[str, Any]], directory: Path
    ) -> None:
        metrics = None
        if trainer.is_global_zero and merged:
            metrics = self.score(merged.values(), directory / f"captions_epoch{trainer.current_epoch}.json")
            samples = list(merged.values())[: self.num_logged_samples]
            table = "\n".join(["| image | prediction | a reference |", "| --- | --- | --- |"] + [
                f"| {row['image_id']} | {row['caption']} | {row['references'][0]} |" for row in samples
            ])
            add_to_tensorboard(trainer, "text", "val/captions", table)
        publish(trainer, pl_module, metrics, prog_bar=("val/CIDEr", "val/BLEU_4"))

    def score(self, rows, results_path: Path) -> dict[str, float]:
        """Write merged rows ({image_id, caption, references}) to `results_path` and score them (no scores when
        `score` is off); an image met twice keeps its first caption."""
        predictions: dict[Any, str] = {}
        references: dict[Any, list[str]] = {}
        for row in rows:
            predictions.setdefault(row["image_id"], row["caption"])
            references.setdefault(row["image_id"], row["references"])
        write_coco_results(results_path, predictions)
        if not self.scoring:
            return {}
        scores = score_captions(predictions, references, meteor=self.meteor)
        return {f"val/{CAPTION_METRIC_NAMES[name]}": value for name, value in scores.items()}
