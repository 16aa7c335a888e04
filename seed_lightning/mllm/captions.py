"""Caption metrics exactly as the COCO caption evaluation (pycocoevalcap's ``COCOEvalCap``) computes them.

Both sides go through the Stanford PTB tokenizer (Java: lower-cases, splits and drops punctuation),
then BLEU-1..4 (``closest`` reference length), METEOR 1.5 (Java), ROUGE-L and CIDEr. The scorer
pycocoevalcap calls ``Cider`` is CIDEr-D (Gaussian length penalty sigma 6, clipped n-gram counts,
document frequencies from the evaluated references, x10): the number captioning papers report as
"CIDEr". SPICE is left out: it downloads Stanford CoreNLP at run time.

Line-breaking characters inside a caption become spaces first: pycocoevalcap sends the PTB tokenizer
one caption per line and replaces only "\n", so a caption holding another line end would come back as
two lines and shift every later caption onto the wrong image.

Images are scored over the predicted image ids (the LAVIS convention: references may cover more
images than the predictions; CIDEr's document frequencies then come from the predicted images'
references only, as in LAVIS's ``coco_caption_eval``).
"""

import functools
import os
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from seed_lightning.core.errors import ConfigError, DataError
from seed_lightning.core.io import write_json_atomic

JAVA_INSTALL_HINT = "install Java 17, e.g. apt-get install -y default-jre-headless"
BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
"""Every character Python's ``str.splitlines`` ends a line at. The PTB tokenizer (Java) ends lines at
"\n", "\r", "\v", "\f", U+2028 and U+2029; it reads \x1c-\x1e as spaces and \x85 as "..." (dropped as
punctuation), so a space in their place tokenizes the same."""
_LINE_BREAKS_TO_SPACES = str.maketrans(dict.fromkeys(LINE_BREAKS, " "))


@functools.cache
def _java_problem() -> str | None:
    """Why `java` cannot run, or None when it can (cached: the answer does not change within a run)."""
    java = shutil.which("java")
    if java is None:
        return "`java` is not on PATH"
    try:
        subprocess.run([java, "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        return f"`{java} -version` failed ({type(error).__name__})"
    return None


def check_java(alternative: str | None = None) -> None:
    """Raise ConfigError when Java (needed by the PTB tokenizer and METEOR) is missing or broken; `alternative`
    completes the message's "install Java, or ..."."""
    problem = _java_problem()
    if problem is not None:
        otherwise = f", or {alternative}" if alternative else ""
        raise ConfigError(f"caption metrics need Java but {problem}: {JAVA_INSTALL_HINT}{otherwise}")


def _validate(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    if not predictions:
        raise DataError("no caption predictions to score: run caption generation on at least one image first")
    missing = [image_id for image_id in predictions if image_id not in references]
    if missing:
        raise DataError(
            f"{len(missing)} predicted image ids have no reference captions (e.g. {missing[:3]}): "
            "score against the annotation file the images came from"
        )
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise DataError(
                f"prediction for image {image_id!r} is {type(caption).__name__}, not str: "
                "pass one caption string per image"
            )
        refs = references[image_id]
        if isinstance(refs, str) or not refs or not all(isinstance(ref, str) for ref in refs):
            raise DataError(f"references for image {image_id!r} must be a non-empty list of strings, got {refs!r:.80}")


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTB tokenization of each image's captions, line breaks inside a caption made spaces."""
    return PTBTokenizer().tokenize(
        {image_id: [{"caption": text.translate(_LINE_BREAKS_TO_SPACES)} for text in texts]
         for image_id, texts in captions.items()}
    )


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    meteor: bool = True,
) -> dict[str, float]:
    """COCO caption scores of one predicted caption per image against that image's reference captions.

    Returns ``Bleu_1``..``Bleu_4``, ``METEOR`` (when ``meteor``; starting its JVM takes ~10 s),
    ``ROUGE_L`` and ``CIDEr`` (CIDEr-D), as fractions (CIDEr is not bounded by 1), identical to
    ``COCOEvalCap.evaluate`` on the same images.
    """
    _validate(predictions, references)
    check_java()
    # Reference order decides the order of per-image scores and hence the last bits of their mean;
    # COCOEvalCap walks the annotation file's image order, which `references` mirrors.
    image_ids = [image_id for image_id in references if image_id in predictions]
    gts = ptb_tokenize({i: references[i] for i in image_ids})
    res = ptb_tokenize({i: [predictions[i]] for i in image_ids})

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {key: float(value) for key, value in zip(BLEU_KEYS, bleu)}
    if meteor:
        meteor_scorer = Meteor()
        try:
            scores["METEOR"] = float(meteor_scorer.compute_score(gts, res)[0])
        finally:
            del meteor_scorer  # its __del__ stops the JVM now rather than at interpreter exit
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def write_coco_results(path: str | os.PathLike, predictions: Mapping[Hashable, str]) -> Path:
    """Write predictions in the COCO caption results format: ``[{"image_id", "caption"}, ...]``."""
    records = [{"image_id": image_id, "caption": caption} for image_id, caption in predictions.items()]
    return write_json_atomic(path, records)
