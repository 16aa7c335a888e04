"""VQAv2 accuracy against hand-computed values of the official rule (GT-Vision-Lab/VQA vqaEval.py)."""

import json

import pytest

from seed_lightning.core.errors import DataError
from seed_lightning.mllm.vqa import (
    majority_answer_baseline,
    normalize_answer,
    question_accuracy,
    read_vqa,
    vqa_accuracy,
    write_vqa_results,
)


def human_answers(*answers: str) -> list[dict]:
    """VQAv2-style human answer records (distinct answer ids)."""
    return [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i, answer in enumerate(answers)]


def record(question_id, answers, question_type="what is", answer_type="other", majority=None) -> dict:
    return {
        "question_id": question_id,
        "image_id": 0,
        "question_type": question_type,
        "answer_type": answer_type,
        "answers": human_answers(*answers),
        "multiple_choice_answer": majority if majority is not None else answers[0],
    }


# Leave-one-out accuracy by hand, m = humans matching out of 10: dropping a matching human
# (m of the 10 subsets) leaves m-1 matches, dropping another one leaves m.
#   m=1: (1*0 + 9*(1/3)) / 10 = 0.3      m=2: (2*(1/3) + 8*(2/3)) / 10 = 0.6
#   m=3: (3*(2/3) + 7*1) / 10 = 0.9      m>=4: 1.0
@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy_by_number_of_matching_humans(matching, expected):
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    if matching == 10:
        answers = ["cat"] * 10
    assert question_accuracy("cat", human_answers(*answers)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("yes.", 1.0),  # period stripped
        ("yes!", 1.0),  # "!" becomes a space, then whitespace collapses
        ("Yes", 1.0),  # lower-cased
        ("  yes \n", 1.0),  # surrounding whitespace
        ("no", 0.3),  # one human of ten said no
        ("yess", 0.0),
    ],
)
def test_punctuation_case_and_whitespace_when_humans_disagree(prediction, expected):
    answers = human_answers(*(["yes"] * 9 + ["no"]))
    assert question_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("prediction", "expected"), [("two", 0.9), ("2", 0.9), ("three", 1.0), ("four", 0.0)])
def test_number_words_are_digits_on_both_sides(prediction, expected):
    # Humans: "2", "two", "2" (three say 2 after normalisation) and seven "3".
    answers = human_answers("2", "two", "2", *["3"] * 7)
    assert question_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("prediction", "expected"), [("a dog", 1.0), ("The Dog.", 1.0), ("an apple", 0.6)])
def test_articles_are_removed(prediction, expected):
    answers = human_answers(*(["dog"] * 5 + ["cat"] * 3 + ["the apple", "apple"]))
    assert question_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_contractions_map_to_the_apostrophe_form():
    answers = human_answers(*(["don't"] * 2 + ["no"] * 8))
    assert question_accuracy("dont", answers) == pytest.approx(0.6, abs=1e-12)
    assert question_accuracy("don't", answers) == pytest.approx(0.6, abs=1e-12)


def test_identical_human_answers_disable_normalisation():
    # The official rule normalises only when the ten answers differ: "Yes" then scores 0.
    answers = human_answers(*["yes"] * 10)
    assert question_accuracy("yes", answers) == 1.0
    assert question_accuracy(" yes\t", answers) == 1.0  # whitespace is always cleaned
    assert question_accuracy("Yes", answers) == 0.0
    assert question_accuracy("yes.", answers) == 0.0


def test_records_without_answer_ids_drop_identical_answers_together():
    # Official quirk: leave-one-out removes every record equal to the left-out one.
    answers = [{"answer": "yes"}] * 3 + [{"answer": "no"}] * 7
    # Dropping a "yes" drops all three (0 matches, 3 subsets); dropping a "no" leaves 3 (7 subsets).
    assert question_accuracy("yes", answers) == pytest.approx(0.7, abs=1e-12)
    assert question_accuracy("yes", human_answers(*["yes"] * 3 + ["no"] * 7)) == pytest.approx(0.9, abs=1e-12)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes.", "yes"),
        ("2.5", "2.5"),  # a period followed by a digit stays
        ("x-y", "x y"),  # punctuation not touching a space becomes a space
        ("x - y", "x y"),  # touching a space: deleted (whitespace then collapses)
        ("1,000 x-y", "1000 xy"),  # a digit,digit comma anywhere deletes every mark
        ("none of the above", "0 of above"),
        ("The Cat's", "cat's"),  # apostrophes are not punctuation
        ("whats up?", "what's up"),
        ("." * 40, "." * 8),  # official quirk: at most 32 periods are stripped
    ],
)
def test_normalize_answer_matches_the_official_steps(answer, expected):
    assert normalize_answer(answer) == expected


def test_vqa_accuracy_aggregates_per_type_and_official_report():
    annotations = [
        record(1, ["yes"] * 10, "is the", "yes/no"),
        record(2, ["2"] * 2 + ["3"] * 8, "how many", "number"),
        record(3, ["red"] * 10, "what color is the", "other"),
        record(4, ["no"] * 10, "is the", "yes/no"),
    ]
    predictions = {1: "yes", 2: "two", 3: "blue", 4: "yes"}
    result = vqa_accuracy(predictions, annotations)
    assert result.per_question == pytest.approx({1: 1.0, 2: 0.6, 3: 0.0, 4: 0.0})
    assert result.overall == pytest.approx(1.6 / 4)
    assert result.per_answer_type == pytest.approx({"yes/no": 0.5, "number": 0.6, "other": 0.0})
    assert result.per_question_type == pytest.approx({"is the": 0.5, "how many": 0.6, "what color is the": 0.0})
    assert result.accuracy == {
        "overall": 40.0,
        "perQuestionType": {"is the": 50.0, "how many": 60.0, "what color is the": 0.0},
        "perAnswerType": {"yes/no": 50.0, "number": 60.0, "other": 0.0},
    }


def test_official_report_rounds_percentages_to_two_decimals():
    annotations = [record(1, ["cat"] + ["dog"] * 9), record(2, ["cat"] * 10), record(3, ["dog"] * 10)]
    result = vqa_accuracy({1: "cat", 2: "cat", 3: "cat"}, annotations)
    assert result.overall == pytest.approx(1.3 / 3)
    assert result.accuracy["overall"] == 43.33


def questions_scoring(*accuracies: float, question_type="what is", answer_type="other") -> list[tuple[dict, str]]:
    """(annotation record, prediction) pairs whose accuracies are `accuracies` (each 0, 0.3, 0.6, 0.9 or 1)."""
    matching = {0.0: 0, 0.3: 1, 0.6: 2, 0.9: 3, 1.0: 10}
    pairs = []
    for accuracy in accuracies:
        answers = ["cat"] * matching[accuracy] + ["dog"] * (10 - matching[accuracy])
        pairs.append((record(len(pairs), answers, question_type, answer_type), "cat"))
    return pairs


def official_report(*groups: list[tuple[dict, str]]) -> dict:
    pairs = [pair for group in groups for pair in group]
    annotations = [dict(annotation, question_id=i) for i, (annotation, _) in enumerate(pairs)]
    return vqa_accuracy({i: prediction for i, (_, prediction) in enumerate(pairs)}, annotations).accuracy


def test_official_report_rounds_exact_ties_away_from_zero():
    # The official evaluator is Python 2 code: its round() sends an exact tie away from zero.
    # 97 of 800 is 12.125 exactly (Python 3's round gives 12.12); 5 of 32 is 15.625.
    numbers = questions_scoring(*[1.0] * 5 + [0.0] * 27, question_type="how many", answer_type="number")
    yes_no = questions_scoring(*[1.0] * 92 + [0.0] * 676, question_type="is the", answer_type="yes/no")
    report = official_report(numbers, yes_no)
    assert report == {
        "overall": 12.13,
        "perQuestionType": {"how many": 15.63, "is the": 11.98},
        "perAnswerType": {"number": 15.63, "yes/no": 11.98},
    }


def test_official_report_is_100_times_the_sum_divided_by_the_count():
    # round(100*sum/n) as officially: 100*(sum/n) would make it 39.38 here.
    assert official_report(questions_scoring(*[0.9] * 21 + [0.0] * 27))["overall"] == 39.37


def test_official_report_sums_left_to_right():
    # The official (Python 2) sum() adds in order; a compensated sum (Python >= 3.12's sum(),
    # math.fsum) gives 31.874999999999996 here and so 31.87.
    assert official_report(questions_scoring(0.6, *[0.9] * 5, *[0.0] * 10))["overall"] == 31.88


def test_vqa_accuracy_leaves_annotations_untouched():
    annotations = [record(1, ["Two."] + ["3"] * 9)]
    snapshot = json.dumps(annotations)
    vqa_accuracy({1: "2"}, annotations)
    assert json.dumps(annotations) == snapshot


def test_predictions_must_cover_exactly_the_annotated_questions():
    annotations = [record(1, ["yes"] * 10), record(2, ["no"] * 10)]
    with pytest.raises(DataError, match="1 missing"):
        vqa_accuracy({1: "yes"}, annotations)
    with pytest.raises(DataError, match="1 without annotation"):
        vqa_accuracy({1: "yes", 2: "no", 3: "no"}, annotations)
    with pytest.raises(DataError, match="lacks"):
        vqa_accuracy({1: "yes"}, [{"question_id": 1, "answers": human_answers("yes")}])
    with pytest.raises(DataError, match="no VQA annotation"):
        vqa_accuracy({}, [])


def test_majority_answer_baseline_per_question_type_with_overall_fallback():
    train = [
        record(1, ["yes"] * 10, "is the", majority="yes"),
        record(2, ["no"] * 10, "is the", majority="no"),
        record(3, ["no"] * 10, "is the", majority="no"),
        record(4, ["2"] * 10, "how many", majority="2"),
    ]
    val = [
        record(10, ["yes"] * 10, "is the"),
        record(11, ["3"] * 10, "how many"),
        record(12, ["red"] * 10, "what color"),
    ]
    assert majority_answer_baseline(train, val) == {10: "no", 11: "2", 12: "no"}
    # A tie goes to the answer met first.
    assert majority_answer_baseline(train[:2], val[:1]) == {10: "yes"}


def test_write_vqa_results_round_trips(tmp_path):
    path = write_vqa_results(tmp_path / "out" / "vqa_results.json", {5: "yes", 7: "2"})
    assert json.loads(path.read_text()) == [{"question_id": 5, "answer": "yes"}, {"question_id": 7, "answer": "2"}]
    assert [p.name for p in path.parent.iterdir()] == ["vqa_results.json"]  # no temp file left behind


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def vqa_files(tmp_path, question_ids=(5, 6), annotation_ids=(5, 6)):
    questions = write_json(
        tmp_path / "questions.json",
        {"questions": [{"question_id": q, "image_id": q * 10, "question": f"What is {q}?"} for q in question_ids]},
    )
    annotations = write_json(
        tmp_path / "annotations.json",
        {
            "annotations": [
                {
                    "question_id": q,
                    "image_id": q * 10,
                    "question_type": "what is",
                    "answer_type": "other",
                    "multiple_choice_answer": f"thing{q}",
                    "answers": [
                        {"answer": f"thing{q}", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)
                    ],
                }
                for q in annotation_ids
            ]
        },
    )
    return questions, annotations


def test_read_vqa_joins_questions_and_answers(tmp_path):
    records = read_vqa(*vqa_files(tmp_path))
    assert [(r.question_id, r.image_id, r.question) for r in records] == [(5, 50, "What is 5?"), (6, 60, "What is 6?")]
    assert records[0].answers == ["thing5"] * 10
    assert (records[1].answer_type, records[1].question_type, records[1].multiple_choice_answer) == (
        "other",
        "what is",
        "thing6",
    )
    questions_only = read_vqa(vqa_files(tmp_path)[0])
    assert questions_only[0].answers == [] and questions_only[0].answer_type is None


def test_read_vqa_errors(tmp_path):
    with pytest.raises(DataError, match="do not match: 1 question ids only in .* \\[7\\]"):
        read_vqa(*vqa_files(tmp_path, question_ids=(5, 6, 7)))
    questions, annotations = vqa_files(tmp_path)
    (tmp_path / "annotations.json").write_text('{"annotations": [{"question_id": 5}, {"question_id": 6}]}')
    with pytest.raises(DataError, match="lacks 'image_id'"):
        read_vqa(questions, annotations)
    (tmp_path / "annotations.json").write_text("{truncated")
    with pytest.raises(DataError, match="not valid JSON"):
        read_vqa(questions, annotations)
    (tmp_path / "questions.json").write_text('{"questions": [{"image_id": 1, "question": "?"}]}')
    with pytest.raises(DataError, match="lacks 'question_id'"):
        read_vqa(questions)
