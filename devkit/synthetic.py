"""A small synthetic image-caption world, written in the formats real users have.

Each image shows 1-3 flat shapes (circle, square, triangle, star, cross) in six saturated colours,
small or large, in distinct cells of a 3x3 grid, on a white, black or gray background. Captions
mention an object's ROW only ("at the top", "in the middle", "at the bottom"), never left/right,
so every caption stays true under horizontal flips and training may keep hflip on. An image's first
caption always has one form (rows given, objects in reading order), so it follows from the image; its other
references vary the wording and the order.

Layout under the output folder (split is ``train`` or ``val``):

- ``shards/{split}-000000.tar`` ...: WebDataset shards in the img2dataset layout: ``KEY.jpg|png``,
  ``KEY.txt`` (the first reference caption) and ``KEY.json`` (``image_id``, ``width``, ``height``,
  ``captions`` = all references, ``scene`` = the drawn objects).
- ``coco/images/{split}/KEY.jpg|png``, ``coco/annotations/captions_{split}.json`` (COCO captions
  format) and ``coco/dataset_synthetic.json`` (Karpathy format: train images have split "train";
  the first half of val is "val", the second half "test").
- ``vqa/questions_{split}.json`` and ``vqa/annotations_{split}.json`` (VQAv2 format, 10 noisy
  human answers per question).
- ``corpus.txt`` (every caption, question and answer, for tokenizer training) and ``stats.json``.

``python -m devkit.synthetic --out data/synthetic`` writes it deterministically
(same arguments -> byte-identical files) in a few seconds.
"""

import argparse
import collections
import io
import json
import math
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset
from PIL import Image, ImageDraw

from seed_lightning.core.errors import ConfigError

FORMAT_VERSION = 2

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SIZES = {"small": 0.5, "large": 0.9}
"""Object size as a fraction of the smaller side of its grid cell."""
ROWS = ("top", "middle", "bottom")
ROW_PHRASES = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}
NUMBER_WORDS = ("zero", "one", "two", "three")

# Every 20 consecutive images: 16 RGB JPEG, 2 RGB PNG, 1 RGBA PNG, 1 palette PNG (readers must convert).
IMAGE_FORMATS = ("jpg",) * 8 + ("png", "rgba") + ("jpg",) * 8 + ("png", "palette")
JPEG_QUALITY = 90
VAL_IMAGE_ID_OFFSET = 1_000_000
"""Val image ids start here, so they never depend on the number of train images."""
SHARD_MTIME = 946684800  # 2000-01-01: fixed tar member times keep shards byte-identical across runs
QUESTIONS_PER_IMAGE = 4
ANSWERS_PER_QUESTION = 10
WRONG_ANSWER_RATE = 0.06


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    """Grid row, 0 (top) to 2 (bottom)."""
    col: int
    """Grid column, 0 (left) to 2 (right); never mentioned in text."""


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    objects: tuple[SceneObject, ...]
    """In distinct grid cells, ordered top-left to bottom-right."""


@dataclass(frozen=True)
class Question:
    """One VQA question with its true answer."""

    question: str
    question_type: str
    answer_type: str
    answer: str
    wrong_answers: tuple[str, ...]
    """Plausible wrong answers of the same kind, for simulated human mistakes."""


def sample_scene(rng: random.Random) -> Scene:
    width = rng.randint(64, 160)
    height = max(64, min(160, round(width * rng.uniform(0.75, 1.33))))
    num_objects = rng.choices((1, 2, 3), weights=(0.3, 0.35, 0.35))[0]
    cells = rng.sample(range(9), num_objects)
    objects: list[SceneObject] = []
    for cell in cells:
        # Repeating an earlier object's look makes "two small red circles" and counting questions common.
        if objects and rng.random() < 0.3:
            template = rng.choice(objects)
            shape, color, size = template.shape, template.color, template.size
        else:
            shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
        objects.append(SceneObject(shape, color, size, row=cell // 3, col=cell % 3))
    objects.sort(key=lambda o: (o.row, o.col))
    return Scene(width, height, rng.choice(list(BACKGROUNDS)), tuple(objects))


def _shape_outline(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - radius), (cx + radius, cy + radius * 0.8), (cx - radius, cy + radius * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = radius, radius / 3
        offsets = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        return [(cx + dx, cy + dy) for dx, dy in offsets]
    raise ValueError(shape)


def render(scene: Scene, rng: random.Random | None) -> Image.Image:
    """Draws the scene without anti-aliasing, so every pixel is exactly a background or object colour. `rng` moves
    each object a little inside its cell; None draws every object at the centre of its cell."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = scene.width / 3, scene.height / 3
    for obj in scene.objects:
        radius = SIZES[obj.size] * min(cell_w, cell_h) / 2
        slack_x, slack_y = cell_w / 2 - radius, cell_h / 2 - radius
        cx, cy = (obj.col + 0.5) * cell_w, (obj.row + 0.5) * cell_h
        if rng is not None:
            cx += rng.uniform(-0.5, 0.5) * slack_x
            cy += rng.uniform(-0.5, 0.5) * slack_y
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif obj.shape == "square":
            side = radius * 0.85
            draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
        else:
            draw.polygon(_shape_outline(obj.shape, cx, cy, radius), fill=fill)
    return image


def encode_image(image: Image.Image, image_format: str) -> tuple[bytes, str]:
    """Returns (file bytes, extension) for one of IMAGE_FORMATS."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue(), "jpg"
    if image_format == "rgba":
        image = image.convert("RGBA")  # fully opaque: any RGBA->RGB conversion keeps the colours
    elif image_format == "palette":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)  # exact: < 16 colours drawn
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _groups(scene: Scene) -> list[list[SceneObject]]:
    """Objects that look alike (same size, colour and shape), in order of first appearance."""
    groups: dict[tuple[str, str, str], list[SceneObject]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.size, obj.color, obj.shape), []).append(obj)
    return list(groups.values())


def _group_phrase(group: list[SceneObject], with_position: bool) -> str:
    first = group[0]
    if len(group) == 1:
        phrase = f"a {first.size} {first.color} {first.shape}"
    else:
        phrase = f"{NUMBER_WORDS[len(group)]} {first.size} {first.color} {_plural(first.shape)}"
    rows = {obj.row for obj in group}
    if with_position and len(rows) == 1:
        phrase += " " + ROW_PHRASES[ROWS[first.row]]
    return phrase


def _caption(scene: Scene, template: int, groups: list[list[SceneObject]]) -> str:
    bg = scene.background
    plain = _join([_group_phrase(g, with_position=False) for g in groups])
    placed = _join([_group_phrase(g, with_position=True) for g in groups])
    if template == 0:
        return f"{plain} on a {bg} background"
    if template == 1:
        return f"a {bg} background with {plain}"
    if template == 2:
        return f"{placed} on a {bg} background"
    if template == 3:
        verb = "is" if len(groups[0]) == 1 else "are"
        return f"there {verb} {plain} on a {bg} background"
    return f"a picture of {placed} against a {bg} background"


NUM_CAPTION_TEMPLATES = 5
CANONICAL_TEMPLATE = 2
"""The first reference caption's template (rows given, objects in reading order): the caption every training
sample carries (``KEY.txt``) is then a function of the image, so what a model learns from it (a caption, the SD
text encoder's embedding of it) can be learnt from the image. The other references vary template and order."""


def describe(scene: Scene, rng: random.Random) -> list[str]:
    """2-3 distinct reference captions: the canonical one first, then others (other templates and object orders)."""
    wanted = rng.choice((2, 3))
    captions = [_caption(scene, CANONICAL_TEMPLATE, _groups(scene))]
    for template in rng.sample(range(NUM_CAPTION_TEMPLATES), NUM_CAPTION_TEMPLATES):
        groups = _groups(scene)
        rng.shuffle(groups)
        caption = _caption(scene, template, groups)
        # Without a single-row group the "placed" templates say the same as the plain ones.
        if caption not in captions:
            captions.append(caption)
        if len(captions) == wanted:
            break
    return captions


def _candidate_questions(scene: Scene, rng: random.Random) -> list[Question]:
    """One question of each kind the scene supports; answers are derived from the scene."""
    objects = scene.objects
    present_shapes = sorted({o.shape for o in objects})
    candidates = []

    # Asking about absent shapes too keeps "1" from dominating the counts.
    shape = rng.choice(present_shapes) if rng.random() < 0.65 else rng.choice(SHAPES)
    count = sum(o.shape == shape for o in objects)
    numbers = tuple(str(n) for n in range(4) if n != count)
    candidates.append(Question(f"how many {_plural(shape)} are there?", "how many", "number", str(count), numbers))
    total = str(len(objects))
    candidates.append(
        Question("how many objects are there?", "how many", "number", total, tuple(n for n in "123" if n != total))
    )

    looks = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(looks))
    else:  # a near miss: right colour or right shape, but not together
        anchor = rng.choice(objects)
        options = [(c, anchor.shape) for c in COLORS] + [(anchor.color, s) for s in SHAPES]
        color, shape = rng.choice([look for look in options if look not in looks])
    answer = "yes" if (color, shape) in looks else "no"
    wrong = ("no",) if answer == "yes" else ("yes",)
    candidates.append(Question(f"is there a {color} {shape}?", "is there a", "yes/no", answer, wrong))

    asked_bg = scene.background if rng.random() < 0.5 else rng.choice([b for b in BACKGROUNDS if b != scene.background])
    answer = "yes" if asked_bg == scene.background else "no"
    wrong = ("no",) if answer == "yes" else ("yes",)
    candidates.append(Question(f"is the background {asked_bg}?", "is the", "yes/no", answer, wrong))

    other_backgrounds = tuple(b for b in BACKGROUNDS if b != scene.background)
    candidates.append(
        Question("what color is the background?", "what color is the", "other", scene.background, other_backgrounds)
    )

    by_shape = collections.Counter(o.shape for o in objects)
    by_color = collections.Counter(o.color for o in objects)
    by_look = collections.Counter((o.color, o.shape) for o in objects)
    obj = rng.choice(objects)
    if by_shape[obj.shape] == 1:
        wrong = tuple(c for c in COLORS if c != obj.color)
        candidates.append(Question(f"what color is the {obj.shape}?", "what color is the", "other", obj.color, wrong))
    if by_color[obj.color] == 1:
        wrong = tuple(s for s in SHAPES if s != obj.shape)
        candidates.append(Question(f"what shape is the {obj.color} object?", "what shape is the", "other", obj.shape, wrong))
    if by_look[(obj.color, obj.shape)] == 1:
        row = ROWS[obj.row]
        wrong = tuple(r for r in ROWS if r != row)
        candidates.append(Question(f"where is the {obj.color} {obj.shape}?", "where is the", "other", row, wrong))
        wrong = tuple(s for s in SIZES if s != obj.size)
        candidates.append(Question(f"what size is the {obj.color} {obj.shape}?", "what size is the", "other", obj.size, wrong))
    return candidates


def ask(scene: Scene, rng: random.Random) -> list[Question]:
    """QUESTIONS_PER_IMAGE questions of different kinds about the scene."""
    candidates = _candidate_questions(scene, rng)
    return rng.sample(candidates, min(QUESTIONS_PER_IMAGE, len(candidates)))


def _surface_form(answer: str, answer_type: str, rng: random.Random) -> str:
    """How a careless human might type a correct answer; VQA answer normalisation maps these back."""
    if answer_type == "number" and rng.random() < 0.25:
        return NUMBER_WORDS[int(answer)]
    roll = rng.random()
    if roll < 0.1:
        return answer.capitalize()
    if roll < 0.17:
        return answer + "."
    if roll < 0.25 and answer_type == "other":
        return "the " + answer
    return answer


def human_answers(question: Question, rng: random.Random) -> list[dict]:
    """ANSWERS_PER_QUESTION VQAv2 answer records with realistic noise (surface variants, rare mistakes)."""
    answers = []
    for answer_id in range(1, ANSWERS_PER_QUESTION + 1):
        if rng.random() < WRONG_ANSWER_RATE:
            text = _surface_form(rng.choice(question.wrong_answers), question.answer_type, rng)
            confidence = rng.choice(("maybe", "no"))
        else:
            text = _surface_form(question.answer, question.answer_type, rng)
            confidence = "yes" if rng.random() < 0.9 else "maybe"
        answers.append({"answer": text, "answer_confidence": confidence, "answer_id": answer_id})
    return answers


@dataclass
class _Record:
    key: str
    image_id: int
    width: int
    height: int
    extension: str
    mode: str
    image_bytes: bytes
    captions: list[str]
    scene: Scene
    questions: list[Question]
    answers: list[list[dict]]


def _make_records(split: str, count: int, seed: int) -> list[_Record]:
    # One random stream per split: the val set does not change when --num-train does.
    rng = random.Random(f"seed-lightning-synthetic-{seed}-{split}")
    id_offset = VAL_IMAGE_ID_OFFSET if split == "val" else 0
    records = []
    for index in range(count):
        scene = sample_scene(rng)
        image = render(scene, rng)
        image_format = IMAGE_FORMATS[index % len(IMAGE_FORMATS)]
        image_bytes, extension = encode_image(image, image_format)
        mode = {"jpg": "RGB", "png": "RGB", "rgba": "RGBA", "palette": "P"}[image_format]
        captions = describe(scene, rng)
        questions = ask(scene, rng)
        answers = [human_answers(q, rng) for q in questions]
        image_id = id_offset + index + 1
        records.append(
            _Record(f"{image_id:09d}", image_id, scene.width, scene.height, extension, mode, image_bytes,
                    captions, scene, questions, answers)
        )
    return records


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _scene_json(scene: Scene) -> dict:
    """The drawn objects; row and col are grid indices counted from the top left."""
    return {"background": scene.background, "objects": [asdict(o) for o in scene.objects]}


def _write_shards(records: list[_Record], shards_dir: Path, split: str, samples_per_shard: int) -> int:
    pattern = str(shards_dir / f"{split}-%06d.tar")
    with webdataset.ShardWriter(
        pattern, maxcount=samples_per_shard, verbose=0, encoder=False,
        mtime=SHARD_MTIME, user="synthetic", group="synthetic", mode=0o644,
    ) as writer:
        for r in records:
            meta = {"image_id": r.image_id, "width": r.width, "height": r.height, "captions": r.captions,
                    "scene": _scene_json(r.scene)}
            writer.write({"__key__": r.key, r.extension: r.image_bytes, "txt": r.captions[0].encode("utf-8"),
                          "json": _json_bytes(meta)})
    return -(-len(records) // samples_per_shard)


def _write_coco(records: list[_Record], coco_dir: Path, split: str) -> None:
    image_dir = coco_dir / "images" / split
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for r in records:
        file_name = f"{r.key}.{r.extension}"
        (image_dir / file_name).write_bytes(r.image_bytes)
        images.append({"id": r.image_id, "file_name": file_name, "width": r.width, "height": r.height})
        for j, caption in enumerate(r.captions):
            annotations.append({"id": r.image_id * 10 + j, "image_id": r.image_id, "caption": caption})
    captions = {
        "info": {"description": f"seed-lightning synthetic shapes, {split} split", "version": str(FORMAT_VERSION)},
        "licenses": [{"id": 1, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
    }
    (coco_dir / "annotations").mkdir(exist_ok=True)
    (coco_dir / "annotations" / f"captions_{split}.json").write_bytes(_json_bytes(captions))


def caption_tokens(caption: str) -> list[str]:
    """Karpathy-style tokens: lowercase words, punctuation dropped."""
    return "".join(c if c.isalnum() or c.isspace() else " " for c in caption.lower()).split()


def _write_karpathy(splits: dict[str, list[_Record]], coco_dir: Path) -> None:
    images, sentence_id = [], 0
    for split, records in splits.items():
        for index, r in enumerate(records):
            karpathy_split = "train" if split == "train" else ("val" if index < len(records) // 2 else "test")
            sentences = []
            for caption in r.captions:
                sentences.append({"tokens": caption_tokens(caption), "raw": caption, "imgid": len(images),
                                  "sentid": sentence_id})
                sentence_id += 1
            images.append({
                "filepath": split, "filename": f"{r.key}.{r.extension}", "imgid": len(images),
                "split": karpathy_split, "cocoid": r.image_id, "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            })
    (coco_dir / "dataset_synthetic.json").write_bytes(_json_bytes({"images": images, "dataset": "synthetic"}))


def _write_vqa(records: list[_Record], vqa_dir: Path, split: str) -> None:
    header = {
        "info": {"description": f"seed-lightning synthetic shapes VQA, {split} split", "version": str(FORMAT_VERSION)},
        "license": {"name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
        "data_subtype": split,
    }
    questions, annotations = [], []
    for r in records:
        for j, (q, answers) in enumerate(zip(r.questions, r.answers)):
            question_id = r.image_id * 1000 + j
            questions.append({"image_id": r.image_id, "question": q.question, "question_id": question_id})
            annotations.append({
                "question_id": question_id, "image_id": r.image_id, "question_type": q.question_type,
                "answer_type": q.answer_type, "multiple_choice_answer": q.answer, "answers": answers,
            })
    question_file = {**header, "task_type": "Open-Ended", "data_type": "synthetic", "questions": questions}
    annotation_file = {**header, "data_type": "synthetic", "annotations": annotations}
    (vqa_dir / f"questions_{split}.json").write_bytes(_json_bytes(question_file))
    (vqa_dir / f"annotations_{split}.json").write_bytes(_json_bytes(annotation_file))


def _corpus_lines(records: list[_Record]) -> list[str]:
    lines = []
    for r in records:
        lines.extend(r.captions)
        for q, answers in zip(r.questions, r.answers):
            lines.append(q.question)
            lines.extend(dict.fromkeys(a["answer"] for a in answers))
    return lines


def _split_stats(records: list[_Record], num_shards: int) -> dict:
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in records:
        for q in r.questions:
            by_type[q.answer_type][q.answer] += 1
    all_answers = sum(by_type.values(), collections.Counter())
    num_questions = sum(all_answers.values())

    def majority(counter: collections.Counter) -> dict:
        answer, count = counter.most_common(1)[0]
        return {"questions": sum(counter.values()), "majority_answer": answer,
                "majority_share": round(count / sum(counter.values()), 4)}

    return {
        "images": len(records),
        "shards": num_shards,
        "captions": sum(len(r.captions) for r in records),
        "distinct_first_captions": len({r.captions[0] for r in records}),
        "image_modes": dict(sorted(collections.Counter(r.mode for r in records).items())),
        "image_extensions": dict(sorted(collections.Counter(r.extension for r in records).items())),
        "questions": num_questions,
        "answer_types": {t: majority(c) for t, c in sorted(by_type.items())},
        "overall_majority": majority(all_answers) if num_questions else None,
    }


def generate(out_dir: str | Path, num_train: int = 4000, num_val: int = 256, seed: int = 0,
             samples_per_shard: int = 1000) -> dict:
    """Writes the synthetic data set to `out_dir` (replacing an earlier one there) and returns its stats."""
    if num_train < 1 or num_val < 1 or samples_per_shard < 1:
        raise ConfigError(
            f"synthetic data needs num_train, num_val and samples_per_shard >= 1 "
            f"(got {num_train}, {num_val}, {samples_per_shard}); pass positive counts"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "stats.json").exists())):
        raise ConfigError(f"{out_dir} exists and is not a synthetic data folder; choose an empty or new --out path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    splits = {split: _make_records(split, count, seed) for split, count in (("train", num_train), ("val", num_val))}

    # Build beside the target and swap in at the end, so an interrupted run never leaves a half data set.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for sub in ("shards", "coco", "vqa"):
            (staging / sub).mkdir()
        split_stats = {}
        for split, records in splits.items():
            num_shards = _write_shards(records, staging / "shards", split, samples_per_shard)
            _write_coco(records, staging / "coco", split)
            _write_vqa(records, staging / "vqa", split)
            split_stats[split] = _split_stats(records, num_shards)
        _write_karpathy(splits, staging / "coco")
        corpus = [line for records in splits.values() for line in _corpus_lines(records)]
        (staging / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
        stats = {
            "format_version": FORMAT_VERSION,
            "arguments": {"num_train": num_train, "num_val": num_val, "seed": seed,
                          "samples_per_shard": samples_per_shard},
            "splits": split_stats,
            "vocabulary": sorted({word for line in corpus for word in caption_tokens(line)}),
        }
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return stats


def is_up_to_date(out_dir: str | Path, num_train: int, num_val: int, seed: int, samples_per_shard: int) -> bool:
    """True when `out_dir` already holds a data set generated with these arguments."""
    stats_file = Path(out_dir) / "stats.json"
    if not stats_file.is_file():
        return False
    stats = json.loads(stats_file.read_text(encoding="utf-8"))
    wanted = {"num_train": num_train, "num_val": num_val, "seed": seed, "samples_per_shard": samples_per_shard}
    return stats.get("format_version") == FORMAT_VERSION and stats.get("arguments") == wanted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/synthetic", help="output folder (default: data/synthetic)")
    parser.add_argument("--num-train", type=int, default=4000, help="train images (default: 4000)")
    parser.add_argument("--num-val", type=int, default=256, help="val images (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default: 1000)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the folder is up to date")
    args = parser.parse_args(argv)
    if not args.force and is_up_to_date(args.out, args.num_train, args.num_val, args.seed, args.samples_per_shard):
        print(f"{args.out} is up to date (use --force to regenerate)")
        return
    try:
        stats = generate(args.out, args.num_train, args.num_val, args.seed, args.samples_per_shard)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    for split, s in stats["splits"].items():
        print(f"{split}: {s['images']} images in {s['shards']} shards, {s['captions']} captions, "
              f"{s['questions']} questions (majority answer {s['overall_majority']['majority_share']:.0%})")
    print(f"wrote {args.out} (vocabulary: {len(stats['vocabulary'])} words)")


if __name__ == "__main__":
    main()
