"""VQAv2 accuracy, exactly as the official evaluation computes it.

Re-implements GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at its latest
commit ("Fixed processing answers bug"; LAVIS ships the same rule), quirks included:

- newlines/tabs become spaces and both sides are stripped;
- answers are normalised ONLY when the 10 human answers are not all identical: then every human
  answer and the prediction go through punctuation handling, then number words -> digits, article
  removal and the contractions table. When all humans agree, the prediction must equal their
  answer verbatim (after strip): "Yes" or "yes." scores 0 against ten "yes";
- punctuation: each mark is deleted if it touches a space anywhere in the answer, or if the answer
  contains a digit,digit comma; otherwise it becomes a space. Periods not followed by a digit are
  deleted, at most 32 of them (the official code passes ``re.UNICODE`` as the ``count`` argument);
- accuracy of a question = mean over the 10 leave-one-out subsets of the human answers of
  min(1, #subset answers equal to the prediction / 3). A "subset" drops every answer record equal
  to the left-out one, so records must carry distinct ``answer_id`` s (VQAv2's do);
- the report (``VQAResult.accuracy``): per group, ``100 * sum / count`` (in that order; the sums
  left to right) rounded to 2 decimals by Python 2's ``round``, which sends exact ties away from
  zero: 97 right of 800 is 12.125 exactly and reported 12.13 (Python 3's ``round``, and ports of
  the evaluator to it, give 12.12).
"""

import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from seed_lightning.core.data.coco import load_json, required_field
from seed_lightning.core.errors import DataError
from seed_lightning.core.io import write_json_atomic


@dataclass
class VQARecord:
    """One VQAv2 question, with its 10 human answers when annotations were given."""

    question_id: int
    image_id: int
    question: str
    answers: list[str] = field(default_factory=list)
    answer_type: str | None = None
    question_type: str | None = None
    multiple_choice_answer: str | None = None


def read_vqa(questions_path: str | Path, annotations_path: str | Path | None = None) -> list[VQARecord]:
    """VQAv2 questions (+ annotations) -> records in question-file order.

    Raises DataError for unreadable JSON, entries lacking a field, or question and annotation files whose question
    ids (or their image ids) differ. Without annotations (test-dev) the answer fields stay empty.
    """
    questions = required_field(load_json(questions_path, "VQA questions file"), "questions", str(questions_path))
    records = []
    for position, entry in enumerate(questions):
        where = f"{questions_path}: questions[{position}]"
        fields = (required_field(entry, key, where) for key in ("question_id", "image_id", "question"))
        records.append(VQARecord(*fields))
    if annotations_path is None:
        return records
    annotations_file = load_json(annotations_path, "VQA annotations file")
    annotations = required_field(annotations_file, "annotations", str(annotations_path))
    by_question: dict[int, dict] = {}
    for position, entry in enumerate(annotations):
        by_question[required_field(entry, "question_id", f"{annotations_path}: annotations[{position}]")] = entry
    question_ids = {record.question_id for record in records}
    if question_ids != by_question.keys():
        only_questions = sorted(question_ids - by_question.keys())
        only_annotations = sorted(by_question.keys() - question_ids)
        raise DataError(
            f"VQA questions and annotations do not match: {len(only_questions)} question ids only in"
            f" {questions_path} (e.g. {only_questions[:3]}), {len(only_annotations)} only in {annotations_path}"
            f" (e.g. {only_annotations[:3]}); use files of the same split"
        )
    for record in records:
        entry = by_question[record.question_id]
        where = f"{annotations_path}: annotation of question {record.question_id}"
        if required_field(entry, "image_id", where) != record.image_id:
            raise DataError(
                f"{where} has image_id {entry['image_id']} but the question has {record.image_id}: mismatched files"
            )
        answers = required_field(entry, "answers", where)
        record.answers = [required_field(answer, "answer", f"{where}.answers") for answer in answers]
        record.answer_type = required_field(entry, "answer_type", where)
        record.question_type = required_field(entry, "question_type", where)
        record.multiple_choice_answer = required_field(entry, "multiple_choice_answer", where)
    return records


# Data tables of the official evaluation, verbatim (keys with capitals can never match: answers are
# lower-cased before the lookup; kept so the table stays the official one).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern reads `(?!<=\d)`, a lookahead that never fires (a lookbehind was meant), so
# in effect it deletes every period not followed by a digit.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
OFFICIAL_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official `sub(..., re.UNICODE)` lands in `count`


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: delete or space out punctuation, then strip periods."""
    delete = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The official test looks at the input text, not at the partly cleaned one.
        if delete or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=OFFICIAL_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The official answer normalisation (whitespace, punctuation, digits, articles, contractions).

    Note: `vqa_accuracy` applies it only to questions whose human answers disagree (the official rule).
    """
    return process_digit_article(process_punctuation(_clean_whitespace(answer)))


@dataclass
class VQAResult:
    """VQAv2 accuracy: raw fractions in [0, 1] plus the official report in ``accuracy``."""

    overall: float
    """Mean per-question accuracy."""
    per_answer_type: dict[str, float]
    """Mean accuracy per ``answer_type`` (``yes/no``, ``number``, ``other``)."""
    per_question_type: dict[str, float]
    """Mean accuracy per ``question_type`` (e.g. ``what color is the``)."""
    per_question: dict[Hashable, float] = field(repr=False)
    """Accuracy of each question id."""
    accuracy: dict[str, Any] = field(repr=False)
    """The official ``VQAEval.accuracy`` dict (``overall``, ``perQuestionType``, ``perAnswerType``): percentages
    computed and rounded to 2 decimals bit for bit as the official evaluator reports them."""


def _sum_in_order(values: Sequence[float]) -> float:
    """Left-to-right float sum, as the official (Python 2) ``sum``; Python >= 3.12's ``sum`` compensates
    rounding errors, which can change the last bits and so a rounded percentage."""
    total = 0.0
    for value in values:
        total += value
    return total


def _mean(values: Sequence[float]) -> float:
    return _sum_in_order(values) / len(values)


def _official_percent(values: Sequence[float]) -> float:
    """``round(100*float(sum(values))/len(values), 2)`` under Python 2: the float is rounded as its exact
    binary value, exact ties away from zero (Python 3's ``round`` sends them to the even digit)."""
    percent = 100 * _sum_in_order(values) / len(values)
    return float(Decimal(percent).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def _validate_record(record: Mapping[str, Any]) -> None:
    missing = [key for key in ("question_id", "question_type", "answer_type", "answers") if key not in record]
    if missing:
        raise DataError(
            f"VQA annotation record {record.get('question_id', record)!r:.80} lacks {missing}: "
            "pass VQAv2 annotation records"
        )
    answers = record["answers"]
    if not answers or not all(isinstance(a, Mapping) and isinstance(a.get("answer"), str) for a in answers):
        raise DataError(
            f"VQA question {record['question_id']!r} needs a non-empty list of {{'answer': str, ...}} human answers"
        )


def question_accuracy(prediction: str, human_answers: Sequence[Mapping[str, Any]]) -> float:
    """Official accuracy of one predicted answer against the human answer records of its question."""
    answers = [dict(answer, answer=_clean_whitespace(answer["answer"])) for answer in human_answers]
    prediction = _clean_whitespace(prediction)
    if len({answer["answer"] for answer in answers}) > 1:
        for answer in answers:
            answer["answer"] = process_digit_article(process_punctuation(answer["answer"]))
        prediction = process_digit_article(process_punctuation(prediction))
    leave_one_out = []
    for left_out in answers:
        # Whole-record inequality, as officially: identical records (no answer_id) drop together.
        matching = sum(1 for answer in answers if answer != left_out and answer["answer"] == prediction)
        leave_one_out.append(min(1.0, matching / 3))
    return _mean(leave_one_out)


def vqa_accuracy(predictions: Mapping[Hashable, str], annotations: Sequence[Mapping[str, Any]]) -> VQAResult:
    """Official VQAv2 accuracy of `predictions` (question id -> answer) over `annotations`.

    As the official ``loadRes``, predictions must cover exactly the annotated questions. Questions are
    scored in the order of `annotations`, as the official code walks its annotation file (the order of a
    float sum decides its last bits). Inputs are not modified (the official code normalises the
    annotations in place).
    """
    if not annotations:
        raise DataError("no VQA annotation records to evaluate: pass the annotations of the evaluated questions")
    for record in annotations:
        _validate_record(record)
    question_ids = [record["question_id"] for record in annotations]
    missing = [qid for qid in question_ids if qid not in predictions]
    extra = set(predictions) - set(question_ids)
    if missing or extra:
        raise DataError(
            f"VQA predictions must cover exactly the annotated questions: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} without annotation (e.g. {sorted(extra, key=str)[:3]})"
        )
    per_question: dict[Hashable, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for record in annotations:
        prediction = predictions[record["question_id"]]
        if not isinstance(prediction, str):
            raise DataError(
                f"VQA prediction for question {record['question_id']!r} is {type(prediction).__name__}, not str"
            )
        accuracy = question_accuracy(prediction, record["answers"])
        per_question[record["question_id"]] = accuracy
        by_answer_type[record["answer_type"]].append(accuracy)
        by_question_type[record["question_type"]].append(accuracy)
    accuracies = list(per_question.values())
    return VQAResult(
        overall=_mean(accuracies),
        per_answer_type={key: _mean(values) for key, values in by_answer_type.items()},
        per_question_type={key: _mean(values) for key, values in by_question_type.items()},
        per_question=per_question,
        accuracy={
            "overall": _official_percent(accuracies),
            "perQuestionType": {key: _official_percent(values) for key, values in by_question_type.items()},
            "perAnswerType": {key: _official_percent(values) for key, values in by_answer_type.items()},
        },
    )


def write_vqa_results(path: str | Path, predictions: Mapping[Hashable, str]) -> Path:
    """Write predictions in the VQAv2 results format (EvalAI upload): ``[{"question_id", "answer"}, ...]``."""
    return write_json_atomic(path, [{"question_id": qid, "answer": answer} for qid, answer in predictions.items()])


def majority_answer_baseline(
    train_annotations: Sequence[Mapping[str, Any]], val_annotations: Sequence[Mapping[str, Any]]
) -> dict[Hashable, str]:
    """Predict, per val question, the most common train ``multiple_choice_answer`` of its ``question_type``.

    Question types unseen in training fall back to the most common answer overall. Ties go to the
    answer met first in `train_annotations`, so the baseline is deterministic.
    """
    if not train_annotations:
        raise DataError("majority-answer baseline needs training annotations: pass a non-empty list of VQAv2 records")
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    overall: Counter[str] = Counter()
    for record in train_annotations:
        if "multiple_choice_answer" not in record or "question_type" not in record:
            raise DataError(
                f"training record {record.get('question_id')!r} lacks multiple_choice_answer/question_type: "
                "pass VQAv2 annotation records"
            )
        by_type[record["question_type"]][record["multiple_choice_answer"]] += 1
        overall[record["multiple_choice_answer"]] += 1
    fallback = overall.most_common(1)[0][0]
    majority = {question_type: counts.most_common(1)[0][0] for question_type, counts in by_type.items()}
    return {record["question_id"]: majority.get(record.get("question_type"), fallback) for record in val_annotations}
