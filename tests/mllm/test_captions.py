"""Caption metrics against pycocoevalcap's own COCOEvalCap on COCO-format files, and hand-known BLEU."""

import json
import math
import subprocess

import pytest
from pycocoevalcap import eval as coco_eval_module
from pycocoevalcap.eval import COCOEvalCap
from pycocotools.coco import COCO

from seed_lightning.core.errors import ConfigError, DataError
from seed_lightning.mllm import captions
from seed_lightning.mllm.captions import LINE_BREAKS, check_java, ptb_tokenize, score_captions, write_coco_results

REFERENCES = {
    11: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave.", "a person surfing in the ocean"],
    12: ["Two dogs play with a frisbee on the grass.", "Dogs running in a park, chasing a toy!"],
    13: ["A plate of food with broccoli and rice.", "A white plate topped with rice and vegetables."],
    14: ["A red bus driving down a city street.", "A double-decker bus on the road."],
    15: ["A cat sleeping on a couch.", "A cat lies on the sofa."],  # not predicted: references may cover more images
}
PREDICTIONS = {
    11: "A man riding a wave on a surfboard.",
    12: "two dogs playing with a frisbee",
    13: "A plate of rice and broccoli, on a table.",
    14: "a bus",
}


class _SkippedScorer:
    """Stands in for a pycocoevalcap scorer the reference run must skip (SPICE needs a download)."""

    def __init__(self, name):
        self.name = name

    def method(self):
        return self.name

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)


def reference_scores(tmp_path, monkeypatch, meteor: bool) -> dict[str, float]:
    """pycocoevalcap's COCOEvalCap on annotation + results files, as LAVIS runs it."""
    annotation = {
        "images": [{"id": image_id} for image_id in REFERENCES],
        "annotations": [
            {"image_id": image_id, "id": 100 * image_id + n, "caption": caption}
            for image_id, refs in REFERENCES.items()
            for n, caption in enumerate(refs)
        ],
    }
    annotation_file = tmp_path / "captions_gt.json"
    annotation_file.write_text(json.dumps(annotation))
    results_file = write_coco_results(tmp_path / "captions_res.json", PREDICTIONS)
    monkeypatch.setattr(coco_eval_module, "Spice", lambda: _SkippedScorer("SPICE"))
    if not meteor:
        monkeypatch.setattr(coco_eval_module, "Meteor", lambda: _SkippedScorer("METEOR"))
    coco = COCO(str(annotation_file))
    coco_result = coco.loadRes(str(results_file))
    evaluator = COCOEvalCap(coco, coco_result)
    evaluator.params["image_id"] = coco_result.getImgIds()
    evaluator.evaluate()
    skipped = {"SPICE"} | (set() if meteor else {"METEOR"})
    return {key: value for key, value in evaluator.eval.items() if key not in skipped}


def test_scores_equal_coco_eval_cap(tmp_path, monkeypatch):
    expected = reference_scores(tmp_path, monkeypatch, meteor=False)
    scores = score_captions(PREDICTIONS, REFERENCES, meteor=False)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert scores == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert 0 < scores["Bleu_4"] < scores["Bleu_1"] < 1  # a non-trivial case, not all zeros or ones


@pytest.mark.slow
def test_scores_with_meteor_equal_coco_eval_cap(tmp_path, monkeypatch):
    expected = reference_scores(tmp_path, monkeypatch, meteor=True)
    scores = score_captions(PREDICTIONS, REFERENCES, meteor=True)
    assert 0 < scores["METEOR"] < 1
    assert scores == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_bleu_1_by_hand():
    references = {1: ["The cat is on the mat."]}
    # Unigram matches: the x2, cat, on, mat = 5 of 6 hypothesis words; equal lengths, no brevity penalty.
    same_length = score_captions({1: "The cat sat on the mat"}, references, meteor=False)
    assert same_length["Bleu_1"] == pytest.approx(5 / 6, rel=1e-6)
    # All 2 words match but the hypothesis is short: brevity penalty exp(1 - 6/2).
    short = score_captions({1: "the cat"}, references, meteor=False)
    assert short["Bleu_1"] == pytest.approx(math.exp(1 - 6 / 2), rel=1e-6)


def test_ptb_tokenization_ignores_case_and_punctuation():
    references = {1: ["a dog runs on the beach", "a brown dog running"]}
    plain = score_captions({1: "a dog running on the beach"}, references, meteor=False)
    noisy = score_captions({1: "A dog, running on the beach!"}, references, meteor=False)
    assert noisy == plain


def test_line_breaks_cover_python_splitlines():
    # The PTB tokenizer's own line ends (\r \v \f U+2028 U+2029) were found by feeding it every code point.
    splits = {chr(code) for code in range(0x110000) if len(f"a{chr(code)}b".splitlines()) > 1}
    assert splits == set(LINE_BREAKS) and {"\r", "\v", "\f", "\u2028", "\u2029"} <= splits


def test_line_breaks_inside_a_caption_leave_the_other_captions_in_place():
    captions = {position: [f"w{position} a{char}b"] for position, char in enumerate([*LINE_BREAKS, "\r\n"])}
    captions["last"] = ["the last caption"]
    tokenized = ptb_tokenize(captions)
    assert tokenized == {**{position: [f"w{position} a b"] for position in captions if position != "last"},
                         "last": ["the last caption"]}


def test_line_breaks_inside_captions_do_not_change_the_scores_of_the_others():
    def with_breaks(text: str, breaks: str) -> str:
        words = text.split(" ")
        return "".join(word + breaks[i % len(breaks)] for i, word in enumerate(words[:-1])) + words[-1]

    broken_predictions = {11: with_breaks(PREDICTIONS[11], "\r\u2028"), 12: PREDICTIONS[12],
                          13: with_breaks(PREDICTIONS[13], "\f"), 14: PREDICTIONS[14]}
    broken_references = {**REFERENCES, 12: [with_breaks(REFERENCES[12][0], "\v\u2029"), REFERENCES[12][1]]}
    assert broken_predictions[11] != PREDICTIONS[11]
    expected = score_captions(PREDICTIONS, REFERENCES, meteor=False)
    assert score_captions(broken_predictions, broken_references, meteor=False) == expected


def test_input_validation():
    with pytest.raises(DataError, match="no caption predictions"):
        score_captions({}, REFERENCES, meteor=False)
    with pytest.raises(DataError, match="no reference captions"):
        score_captions({999: "a cat"}, REFERENCES, meteor=False)
    with pytest.raises(DataError, match="non-empty list of strings"):
        score_captions({1: "a cat"}, {1: []}, meteor=False)
    with pytest.raises(DataError, match="not str"):
        score_captions({11: ["a cat"]}, REFERENCES, meteor=False)


@pytest.mark.parametrize("failure", ["missing", "broken"])
def test_check_java_explains_how_to_install(monkeypatch, failure):
    captions._java_problem.cache_clear()
    if failure == "missing":
        monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    else:
        def failing_run(*args, **kwargs):
            raise subprocess.CalledProcessError(1, args[0])

        monkeypatch.setattr(captions.subprocess, "run", failing_run)
    try:
        with pytest.raises(ConfigError, match="apt-get install -y default-jre-headless"):
            check_java()
        with pytest.raises(ConfigError, match="need Java"):
            score_captions({11: "a man"}, REFERENCES, meteor=False)
    finally:
        captions._java_problem.cache_clear()


def test_write_coco_results_is_the_coco_format(tmp_path):
    path = write_coco_results(tmp_path / "nested" / "res.json", {3: "a cat", 1: "a dog"})
    assert json.loads(path.read_text()) == [{"image_id": 3, "caption": "a cat"}, {"image_id": 1, "caption": "a dog"}]
    assert [p.name for p in path.parent.iterdir()] == ["res.json"]
