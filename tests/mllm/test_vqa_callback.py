"""VQAAccuracyCallback: official VQAv2 accuracy of the MLLM's answers, by answer type, files in the official format."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from seed_lightning.core import validation as validation_callbacks
from seed_lightning.core.errors import DataError
from seed_lightning.mllm.vqa import majority_answer_baseline, vqa_accuracy
from seed_lightning.mllm import vqa_callback
from seed_lightning.mllm.vqa_callback import VQAAccuracyCallback

# (image_id, question_id, question, answer type, question type, 10 human answers, the fake model's answer)
QUESTIONS = [
    (100, 1, "is the background white?", "yes/no", "is the", ["yes"] * 10, "Yes"),  # all agree: verbatim -> 0
    (100, 2, "how many circles are there?", "number", "how many", ["two"] * 4 + ["2"] * 3 + ["3"] * 3, "2"),
    (101, 3, "what color is the star?", "other", "what color is the", ["red"] * 2 + ["the red"] + ["blue"] * 7,
     "Red."),
    (101, 4, "is there a square?", "yes/no", "is there a", ["no"] * 9 + ["yes"], "no"),
    (102, 5, "what shape is at the top?", "other", "what shape is", ["circle"] * 5 + ["a circle"] * 5, "circle"),
    (103, 6, "what is it?", "other", "what is", ["dont know"] * 3 + ["don't know"] * 7, "dont know"),
]
ANSWERS = {question: answer for _, _, question, *_, answer in QUESTIONS}


def write_vqa_files(directory, questions=QUESTIONS):
    question_file = directory / "questions.json"
    annotation_file = directory / "annotations.json"
    question_file.write_text(json.dumps({"questions": [
        {"image_id": image_id, "question_id": qid, "question": question} for image_id, qid, question, *_ in questions
    ]}))
    annotations = [
        {"image_id": image_id, "question_id": qid, "answer_type": answer_type, "question_type": question_type,
         "multiple_choice_answer": answers[0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": n} for n, a in enumerate(answers, 1)]}
        for image_id, qid, _, answer_type, question_type, answers, _ in questions
    ]
    annotation_file.write_text(json.dumps({"annotations": annotations}))
    return question_file, annotation_file, annotations


class FakeMLLM:
    def __init__(self):
        self.calls = []

    def answer(self, codes, questions, max_new_tokens=10, num_beams=5, batch_size=None):
        self.calls.append((codes[:, 0].tolist(), list(questions), num_beams, batch_size))
        return [ANSWERS[question] for question in questions]


class AnsweringModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.mllm = FakeMLLM()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def validation_step(self, batch, batch_idx):
        return None


def make_batch(image_ids: list[int], indices: list[int]) -> dict:
    return {
        "codes": torch.tensor([[image_id] * 32 for image_id in image_ids]),
        "caption": ["a caption"] * len(image_ids),
        "key": [str(i) for i in image_ids],
        "meta": [{"image_id": image_id, "captions": ["a caption"]} for image_id in image_ids],
        "index": torch.tensor(indices),
    }


def validate(tmp_path, callback, *batches, module=None):
    trainer = L.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run", version=""),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[callback])
    module = module or AnsweringModule()
    return trainer.validate(module, dataloaders=DataLoader(list(batches), batch_size=None), verbose=False)[0], module


def test_accuracy_equals_the_official_rule_on_tricky_answers(tmp_path, monkeypatch):
    question_file, annotation_file, annotations = write_vqa_files(tmp_path)
    # Simulated rank 1 answered image 103 (index 3) and, as sampler padding, image 100 again (index 0).
    rank1 = {3: {6: "dont know"}, 0: {1: "wrong", 2: "wrong"}}
    monkeypatch.setattr(validation_callbacks, "gather_objects", lambda local: [local, rank1])
    callback = VQAAccuracyCallback(str(question_file), str(annotation_file), train_annotations=str(annotation_file))
    results, module = validate(tmp_path, callback, make_batch([100, 101], [0, 1]), make_batch([102, 999], [2, 4]))

    predictions = {qid: answer for _, qid, *_, answer in QUESTIONS}
    expected = vqa_accuracy(predictions, annotations)
    per_question = expected.per_question
    assert per_question[1] == 0.0 and per_question[2] == 1.0 and per_question[6] == 1.0  # the tricky cases
    assert results["val/vqa_acc"] == pytest.approx(100 * expected.overall)
    assert results["val/vqa_acc_yes_no"] == pytest.approx(100 * expected.per_answer_type["yes/no"])
    assert results["val/vqa_acc_number"] == pytest.approx(100 * expected.per_answer_type["number"])
    assert results["val/vqa_acc_other"] == pytest.approx(100 * expected.per_answer_type["other"])
    assert results["val/vqa_questions"] == len(QUESTIONS)
    baseline = vqa_accuracy(majority_answer_baseline(annotations, annotations), annotations).overall
    assert results["val/vqa_acc_majority_baseline"] == pytest.approx(100 * baseline)

    # Every question of a val batch goes in one call, with at most the val batch size (2) per generate call and
    # the configured beam width; image 999 has none.
    assert module.mllm.calls == [
        ([100, 100, 101, 101], [q[2] for q in QUESTIONS[:4]], 5, 2),
        ([102], [QUESTIONS[4][2]], 5, 2),
    ]
    written = json.loads((tmp_path / "run" / "vqa_results_epoch0.json").read_text())
    assert written == [{"question_id": qid, "answer": answer} for _, qid, *_, answer in QUESTIONS]
    report = json.loads((tmp_path / "run" / "vqa_accuracy_epoch0.json").read_text())
    assert report["overall"] == round(100 * expected.overall, 2) and set(report["perAnswerType"]) == {
        "yes/no", "number", "other"}


def test_mismatched_files_fail_at_setup(tmp_path):
    question_file, annotation_file, _ = write_vqa_files(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_annotations, _ = write_vqa_files(other, QUESTIONS[:2])
    callback = VQAAccuracyCallback(str(question_file), str(other_annotations))
    with pytest.raises(DataError, match="do not match"):
        validate(tmp_path, callback, make_batch([100], [0]))
    with pytest.raises(DataError, match="cannot read"):
        validate(tmp_path, VQAAccuracyCallback(str(tmp_path / "nope.json"), str(annotation_file)), make_batch([100], [0]))


def test_no_val_image_with_questions_is_a_data_error(tmp_path):
    question_file, annotation_file, _ = write_vqa_files(tmp_path)
    with pytest.raises(DataError, match="no val image has a question"):
        validate(tmp_path, VQAAccuracyCallback(str(question_file), str(annotation_file)), make_batch([999], [0]))


def test_sample_answers_are_shown_as_text_with_their_question_and_the_human_answers(tmp_path, monkeypatch):
    question_file, annotation_file, _ = write_vqa_files(tmp_path)
    shown = []
    monkeypatch.setattr(vqa_callback, "add_to_tensorboard", lambda trainer, *args: shown.append(args))
    callback = VQAAccuracyCallback(str(question_file), str(annotation_file), num_logged_samples=3)
    validate(tmp_path, callback, make_batch([100, 101], [0, 1]), make_batch([102, 103], [2, 3]))
    ((kind, tag, table),) = shown
    assert (kind, tag) == ("text", "val/vqa_answers")
    rows = table.splitlines()[2:]
    assert rows == [
        "| 100 | is the background white? | Yes | yes |",
        "| 100 | how many circles are there? | 2 | two, 2, 3 |",
        "| 101 | what color is the star? | Red. | red, the red, blue |",
    ]
