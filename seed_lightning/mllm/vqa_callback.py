"""VQAv2 accuracy on validation: the MLLM answers the questions asked about each val image."""

import json
from pathlib import Path
from typing import Any

import lightning as L

from seed_lightning.core.errors import DataError
from seed_lightning.core.io import write_json_atomic
from seed_lightning.core.preflight import check_files
from seed_lightning.core.validation import (
    IndexedValidationCallback,
    add_to_tensorboard,
    check_positive,
    publish,
    require_attribute,
)
from seed_lightning.mllm.vqa import majority_answer_baseline, read_vqa, vqa_accuracy, write_vqa_results


def _metric_suffix(answer_type: str) -> str:
    return answer_type.replace("/", "_").replace(" ", "_")  # "yes/no" -> "yes_no": one TensorBoard tag


class VQAAccuracyCallback(IndexedValidationCallback):
    """For every val image with questions in the VQAv2 files (matched by ``meta["image_id"]``) asks
    ``pl_module.mllm.answer`` and scores with the official VQAv2 rule.

    Logs val/vqa_acc (overall) and val/vqa_acc_{yes_no,number,other} in percent (as papers report),
    val/vqa_questions (questions scored) and, given the train annotations, the majority-answer
    baseline on the same questions as val/vqa_acc_majority_baseline. Writes
    ``vqa_results_epoch{N}.json`` (official results format) and ``vqa_accuracy_epoch{N}.json`` (the
    official accuracy report) into the run folder, and shows sample answers as TensorBoard text (val/vqa_answers).
    """

    def __init__(
        self,
        questions: str,
        annotations: str,
        train_annotations: str | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 10,
        every_n_epochs: int = 1,
        num_logged_samples: int = 16,
    ) -> None:
        """
        Args:
            questions: VQAv2 questions JSON of the val images (e.g. v2_OpenEnded_mscoco_val2014_questions.json).
            annotations: The matching VQAv2 annotations JSON (10 human answers per question).
            train_annotations: VQAv2 train annotations; when given, the majority-answer baseline is logged too.
            num_beams: Beam width of answer generation (reference: 5).
            max_new_tokens: Longest answer generated, in LM tokens.
            every_n_epochs: Evaluate after every n-th training epoch (trainer.validate always evaluates).
            num_logged_samples: Questions shown with the predicted and the human answers as TensorBoard text.
        """
        super().__init__(every_n_epochs)
        check_positive(num_beams=num_beams, max_new_tokens=max_new_tokens)
        self.num_logged_samples = num_logged_samples
        self.questions_path = questions
        self.annotations_path = annotations
        self.train_annotations_path = train_annotations
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self._questions_by_image: dict[Any, list[tuple[int, str]]] | None = None
        self._annotations: dict[int, dict[str, Any]] = {}
        self._train_annotations: list[dict[str, Any]] | None = None

    @classmethod
    def check_requirements(cls, init_args: dict[str, Any], stage: str) -> None:
        """The VQAv2 files exist (see `seed_lightning.core.preflight`)."""
        check_files(cls.__name__, init_args["questions"], init_args["annotations"], init_args["train_annotations"],
                    how="download VQAv2 (https://visualqa.org/download.html) or fix the path in its init_args")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_attribute(pl_module, "mllm", type(self).__name__)
        if self._questions_by_image is not None:
            return
        records = read_vqa(self.questions_path, self.annotations_path)  # DataError on unreadable / mismatched files
        self._questions_by_image = {}
        for record in records:
            self._questions_by_image.setdefault(record.image_id, []).append((record.question_id, record.question))
            # vqa_accuracy takes VQAv2 answer records; VQAv2's answer_ids are 1..10 in file order.
            self._annotations[record.question_id] = {
                "question_id": record.question_id,
                "question_type": record.question_type,
                "answer_type": record.answer_type,
                "answers": [{"answer": answer, "answer_id": number} for number, answer in enumerate(record.answers, 1)],
            }
        if self.train_annotations_path is not None:
            self._train_annotations = _read_annotations(self.train_annotations_path)

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> dict[int, dict[int, str]]:
        asked = []  # (row, question_id, question)
        for row, meta in enumerate(batch["meta"]):
            for question_id, question in self._questions_by_image.get(meta.get("image_id"), []):
                asked.append((row, question_id, question))
        if not asked:
            return {}
        indices = batch["index"].tolist()
        # One call for the whole batch, so that the LM can group prompts of one length (it never pads them);
        # at most as many prompts per generate call as the val batch has images.
        answers = pl_module.mllm.answer(
            batch["codes"][[row for row, _, _ in asked]], [question for _, _, question in asked],
            max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, batch_size=len(indices),
        )
        outputs: dict[int, dict[int, str]] = {}
        for (row, question_id, _), answer in zip(asked, answers, strict=True):
            outputs.setdefault(indices[row], {})[question_id] = answer
        return outputs

    def finish(
        self, trainer: L.Trainer, pl_module: L.LightningModule, merged: dict[int, dict[int, str]], directory: Path
    ) -> None:
        predictions = {qid: answer for answers in merged.values() for qid, answer in answers.items()}
        if not predictions:
            raise DataError(
                f"no val image has a question in {self.questions_path}: pass the VQA files of the val images "
                "(question image_id must equal the shards' meta image_id)"
            )
        metrics = None
        if trainer.is_global_zero:
            metrics = self.score(predictions, directory, trainer.current_epoch)
            if self.num_logged_samples:
                add_to_tensorboard(trainer, "text", "val/vqa_answers", self.samples_table(predictions))
        publish(trainer, pl_module, metrics, prog_bar=("val/vqa_acc",))

    def samples_table(self, predictions: dict[int, str]) -> str:
        """The first `num_logged_samples` questions (by question id) as a Markdown table: image, question, the
        predicted answer and the human answers."""
        asked = {question_id: (image_id, question) for image_id, questions in self._questions_by_image.items()
                 for question_id, question in questions}
        lines = ["| image | question | answer | human answers |", "| --- | --- | --- | --- |"]
        for question_id in sorted(predictions)[: self.num_logged_samples]:
            image_id, question = asked[question_id]
            humans = ", ".join(dict.fromkeys(a["answer"] for a in self._annotations[question_id]["answers"]))
            lines.append(f"| {image_id} | {question} | {predictions[question_id]} | {humans} |")
        return "\n".join(lines)

    def score(self, predictions: dict[int, str], directory: Path, epoch: int) -> dict[str, float]:
        """Official accuracy of `predictions` (question id -> answer) in percent; writes the result files."""
        # Annotation-file order: the order the official evaluation walks (and the results file lists).
        annotations = [record for qid, record in self._annotations.items() if qid in predictions]
        predictions = {record["question_id"]: predictions[record["question_id"]] for record in annotations}
        result = vqa_accuracy(predictions, annotations)
        write_vqa_results(directory / f"vqa_results_epoch{epoch}.json", predictions)
        write_json_atomic(directory / f"vqa_accuracy_epoch{epoch}.json", result.accuracy)
        metrics = {"val/vqa_acc": 100 * result.overall, "val/vqa_questions": float(len(predictions))}
        for answer_type, accuracy in result.per_answer_type.items():
            metrics[f"val/vqa_acc_{_metric_suffix(answer_type)}"] = 100 * accuracy
        if self._train_annotations is not None:
            baseline = majority_answer_baseline(self._train_annotations, annotations)
            metrics["val/vqa_acc_majority_baseline"] = 100 * vqa_accuracy(baseline, annotations).overall
        return metrics


def _read_annotations(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as error:
        raise DataError(f"cannot read VQA annotations {path!r}: {error.strerror or error}; check the path") from None
    except ValueError as error:
        raise DataError(f"VQA annotations {path!r} are not valid JSON ({error}); re-download the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path!r} has no 'annotations' list: pass a VQAv2 annotations file")
    return data["annotations"]
