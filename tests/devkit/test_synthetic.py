"""The synthetic data set: deterministic, fast, in the documented formats, and learnable (answers follow the scene)."""

import collections
import io
import json
import re
import tarfile
import time
from pathlib import Path

import pytest
import webdataset
from PIL import Image

from devkit import synthetic
from seed_lightning.core.errors import ConfigError

NUM_TRAIN, NUM_VAL, PER_SHARD = 90, 40, 40
ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3"}
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross",
           "objects": "object"}


def normalise(answer: str) -> str:
    """The parts of the official VQA normalisation the synthetic noise relies on."""
    words = answer.lower().replace(".", " ").split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def file_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "synthetic"
    synthetic.generate(out, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0, samples_per_shard=PER_SHARD)
    return out


@pytest.fixture(scope="module")
def shard_samples(data_dir) -> dict[str, list[dict]]:
    """split -> samples read back with webdataset, in shard order."""
    samples = {}
    for split in ("train", "val"):
        urls = [str(p) for p in sorted((data_dir / "shards").glob(f"{split}-*.tar"))]
        samples[split] = list(webdataset.WebDataset(urls, shardshuffle=False))
    return samples


def test_same_seed_gives_identical_bytes_and_another_seed_differs(data_dir, tmp_path):
    synthetic.generate(tmp_path / "again", num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0, samples_per_shard=PER_SHARD)
    assert file_tree(tmp_path / "again") == file_tree(data_dir)

    synthetic.generate(tmp_path / "seed1", num_train=NUM_TRAIN, num_val=NUM_VAL, seed=1, samples_per_shard=PER_SHARD)
    captions = "coco/annotations/captions_val.json"
    assert (tmp_path / "seed1" / captions).read_bytes() != (data_dir / captions).read_bytes()


def test_val_split_does_not_depend_on_train_size(data_dir, tmp_path):
    synthetic.generate(tmp_path / "small", num_train=7, num_val=NUM_VAL, seed=0, samples_per_shard=PER_SHARD)
    small = file_tree(tmp_path / "small")
    full = file_tree(data_dir)
    val_files = [name for name in full if "val" in name and "dataset_synthetic" not in name]
    assert val_files and all(small[name] == full[name] for name in val_files)


def test_generation_is_fast(tmp_path):
    start = time.perf_counter()
    synthetic.generate(tmp_path / "timed", num_train=500, num_val=50)
    # ~0.6 s on one core; the bound leaves room for a busy shared machine.
    assert time.perf_counter() - start < 15


def test_shards_follow_the_img2dataset_layout(data_dir, shard_samples):
    train_shards = sorted(p.name for p in (data_dir / "shards").glob("train-*.tar"))
    assert train_shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.name for p in (data_dir / "shards").glob("val-*.tar")] == ["val-000000.tar"]

    with tarfile.open(data_dir / "shards" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 3 * PER_SHARD
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(synthetic.SHARD_MTIME, 0, 0, 0o644)}

    modes = collections.Counter()
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        samples = shard_samples[split]
        assert len(samples) == count
        keys = [s["__key__"] for s in samples]
        assert keys == sorted(keys) and len(set(keys)) == count
        for sample in samples:
            image_ext = {"jpg", "png"} & sample.keys()
            assert len(image_ext) == 1 and {"txt", "json"} <= sample.keys()
            assert re.fullmatch(r"\d{9}", sample["__key__"])
            meta = json.loads(sample["json"])
            assert meta["image_id"] == int(sample["__key__"])
            assert 2 <= len(meta["captions"]) <= 3
            assert sample["txt"].decode() == meta["captions"][0]
            image = Image.open(io.BytesIO(sample[image_ext.pop()]))
            assert image.size == (meta["width"], meta["height"])
            assert 64 <= min(image.size) and max(image.size) <= 160
            modes[image.mode] += 1
    assert set(modes) == {"RGB", "RGBA", "P"}
    assert modes["RGB"] > 0.8 * sum(modes.values())  # mostly plain RGB, a few to convert


def test_colours_survive_conversion_to_rgb(shard_samples):
    checked_lossless = 0
    for sample in shard_samples["val"] + shard_samples["train"]:
        meta = json.loads(sample["json"])
        scene = meta["scene"]
        background = synthetic.BACKGROUNDS[scene["background"]]
        wanted = {background} | {synthetic.COLORS[o["color"]] for o in scene["objects"]}
        rgb = Image.open(io.BytesIO(sample.get("png") or sample["jpg"])).convert("RGB")
        if "png" in sample:
            assert {colour for _, colour in rgb.getcolors()} == wanted
            checked_lossless += 1
        else:  # JPEG: the most frequent colour is still (nearly) the background colour
            _, most_frequent = max(rgb.getcolors(maxcolors=1 << 16))
            assert max(abs(a - b) for a, b in zip(most_frequent, background)) <= 8
    assert checked_lossless >= 20


def group_phrase(size: str, color: str, shape: str, count: int) -> str:
    """How a caption names `count` alike objects, up to the plural ending ("two small red circle" is in "...circles")."""
    return f"a {size} {color} {shape}" if count == 1 else f"{synthetic.NUMBER_WORDS[count]} {size} {color} {shape}"


def test_captions_describe_the_scene_without_left_or_right(shard_samples):
    for sample in shard_samples["val"]:
        meta = json.loads(sample["json"])
        scene = meta["scene"]
        looks = collections.Counter((o["size"], o["color"], o["shape"]) for o in scene["objects"])
        for caption in meta["captions"]:
            words = caption.replace(",", "").split()
            assert f"{scene['background']} background" in caption
            assert "left" not in words and "right" not in words  # captions stay true under hflip
            for (size, color, shape), count in looks.items():
                assert group_phrase(size, color, shape, count) in caption


def test_the_first_caption_follows_from_the_image(shard_samples):
    """What every training sample carries (KEY.txt) has one form: objects in reading order, the row of each group
    that sits in one row; so a model can learn it (and the SD text encoder's embedding of it) from the image."""
    placed_somewhere = 0
    for sample in shard_samples["val"]:
        meta = json.loads(sample["json"])
        caption, objects = sample["txt"].decode(), meta["scene"]["objects"]
        assert caption == meta["captions"][0]
        groups: dict[tuple, list[dict]] = {}
        for obj in sorted(objects, key=lambda o: (o["row"], o["col"])):
            groups.setdefault((obj["size"], obj["color"], obj["shape"]), []).append(obj)
        starts = []
        for (size, color, shape), members in groups.items():
            phrase = group_phrase(size, color, shape, len(members))
            if len(members) > 1:
                phrase = synthetic._plural(phrase)
            rows = {member["row"] for member in members}
            if len(rows) == 1:
                phrase += " " + synthetic.ROW_PHRASES[synthetic.ROWS[rows.pop()]]
                placed_somewhere += 1
            assert phrase in caption, (phrase, caption)
            starts.append(caption.index(phrase))
        assert starts == sorted(starts), caption
        assert caption.endswith(f"on a {meta['scene']['background']} background")
    assert placed_somewhere > len(shard_samples["val"]) // 2


def test_captions_are_mostly_unique(data_dir):
    coco = read_json(data_dir / "coco/annotations/captions_val.json")
    by_image = collections.defaultdict(list)
    for annotation in coco["annotations"]:
        by_image[annotation["image_id"]].append(annotation["caption"])
    first_captions = [captions[0] for captions in by_image.values()]
    assert len(set(first_captions)) >= 0.9 * len(first_captions)
    assert all(len(set(captions)) == len(captions) for captions in by_image.values())


def test_coco_and_karpathy_files_match_the_shards(data_dir, shard_samples):
    split_ids = {}
    for split in ("train", "val"):
        coco = read_json(data_dir / f"coco/annotations/captions_{split}.json")
        assert {"info", "licenses", "images", "annotations"} <= coco.keys()
        ids = [image["id"] for image in coco["images"]]
        assert ids == [json.loads(s["json"])["image_id"] for s in shard_samples[split]]
        split_ids[split] = set(ids)
        for image in coco["images"]:
            with Image.open(data_dir / "coco/images" / split / image["file_name"]) as file:
                assert file.size == (image["width"], image["height"])
        annotation_ids = [a["id"] for a in coco["annotations"]]
        assert len(set(annotation_ids)) == len(annotation_ids)
        per_image = collections.Counter(a["image_id"] for a in coco["annotations"])
        assert set(per_image) == split_ids[split] and set(per_image.values()) <= {2, 3}
    assert not split_ids["train"] & split_ids["val"]

    karpathy = read_json(data_dir / "coco/dataset_synthetic.json")
    splits = collections.Counter(image["split"] for image in karpathy["images"])
    assert splits == {"train": NUM_TRAIN, "val": NUM_VAL // 2, "test": NUM_VAL - NUM_VAL // 2}
    for image in karpathy["images"]:
        assert (data_dir / "coco/images" / image["filepath"] / image["filename"]).is_file()
        assert image["cocoid"] in split_ids["train" if image["split"] == "train" else "val"]
        for sentence in image["sentences"]:
            assert sentence["tokens"] == re.sub(r"[^a-z0-9 ]", " ", sentence["raw"].lower()).split()


def test_vqa_files_follow_the_vqav2_format(data_dir):
    coco_ids = {i["id"] for s in ("train", "val") for i in read_json(data_dir / f"coco/annotations/captions_{s}.json")["images"]}
    for split in ("train", "val"):
        questions = read_json(data_dir / f"vqa/questions_{split}.json")
        annotations = read_json(data_dir / f"vqa/annotations_{split}.json")
        assert {"info", "task_type", "data_type", "license", "data_subtype", "questions"} <= questions.keys()
        assert {"info", "data_type", "license", "data_subtype", "annotations"} <= annotations.keys()
        assert questions["data_subtype"] == split
        by_id = {q["question_id"]: q for q in questions["questions"]}
        assert len(by_id) == len(questions["questions"]) == len(annotations["annotations"])
        for annotation in annotations["annotations"]:
            question = by_id[annotation["question_id"]]
            assert question["image_id"] == annotation["image_id"] and question["image_id"] in coco_ids
            assert annotation["answer_type"] in {"yes/no", "number", "other"}
            answers = annotation["answers"]
            assert [a["answer_id"] for a in answers] == list(range(1, 11))
            assert {a["answer_confidence"] for a in answers} <= {"yes", "maybe", "no"}
            majority = collections.Counter(normalise(a["answer"]) for a in answers).most_common(1)[0][0]
            assert majority == annotation["multiple_choice_answer"]


def test_vqa_answers_follow_from_the_scene(data_dir, shard_samples):
    scenes = {json.loads(s["json"])["image_id"]: json.loads(s["json"])["scene"] for s in shard_samples["val"]}
    questions = {q["question_id"]: q["question"] for q in read_json(data_dir / "vqa/questions_val.json")["questions"]}
    checked = collections.Counter()
    for annotation in read_json(data_dir / "vqa/annotations_val.json")["annotations"]:
        scene, question, answer = scenes[annotation["image_id"]], questions[annotation["question_id"]], annotation["multiple_choice_answer"]
        objects = scene["objects"]
        if match := re.fullmatch(r"how many (\w+) are there\?", question):
            shape = PLURALS[match.group(1)]
            expected = len(objects) if shape == "object" else sum(o["shape"] == shape for o in objects)
            assert answer == str(expected), question
        elif match := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
            present = any((o["color"], o["shape"]) == match.groups() for o in objects)
            assert answer == ("yes" if present else "no"), question
        elif match := re.fullmatch(r"is the background (\w+)\?", question):
            assert answer == ("yes" if match.group(1) == scene["background"] else "no")
        elif question == "what color is the background?":
            assert answer == scene["background"]
        elif match := re.fullmatch(r"what color is the (\w+)\?", question):
            assert [o["color"] for o in objects if o["shape"] == match.group(1)] == [answer]
        elif match := re.fullmatch(r"what shape is the (\w+) object\?", question):
            assert [o["shape"] for o in objects if o["color"] == match.group(1)] == [answer]
        elif match := re.fullmatch(r"(where|what size) is the (\w+) (\w+)\?", question):
            (obj,) = [o for o in objects if (o["color"], o["shape"]) == match.group(2, 3)]
            assert answer == (synthetic.ROWS[obj["row"]] if match.group(1) == "where" else obj["size"])
        else:
            pytest.fail(f"unexpected question {question!r}")
        checked[question.split()[0]] += 1
    assert set(checked) == {"how", "is", "what", "where"}


def test_vqa_answers_are_balanced_and_humanly_noisy(data_dir):
    annotations = [a for s in ("train", "val") for a in read_json(data_dir / f"vqa/annotations_{s}.json")["annotations"]]
    by_type = collections.defaultdict(collections.Counter)
    for annotation in annotations:
        by_type[annotation["answer_type"]][annotation["multiple_choice_answer"]] += 1
    shares = {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_type.items()}
    overall = sum(by_type.values(), collections.Counter())
    print("majority answer share per type:", shares)  # visible with -s
    assert set(shares) == {"yes/no", "number", "other"}
    assert shares["yes/no"] < 0.65 and shares["number"] < 0.5 and shares["other"] < 0.3
    assert overall.most_common(1)[0][1] / len(annotations) < 0.3

    raw_differs = sum(len({a["answer"] for a in annotation["answers"]}) > 1 for annotation in annotations)
    assert raw_differs > 0.3 * len(annotations)  # normalisation matters
    all_answers = [a["answer"] for annotation in annotations for a in annotation["answers"]]
    assert {"Yes", "two", "yes."} & set(all_answers)

    stats = read_json(data_dir / "stats.json")
    val_stats = stats["splits"]["val"]["answer_types"]
    val_annotations = read_json(data_dir / "vqa/annotations_val.json")["annotations"]
    for answer_type, reported in val_stats.items():
        counter = collections.Counter(a["multiple_choice_answer"] for a in val_annotations if a["answer_type"] == answer_type)
        assert reported["questions"] == sum(counter.values())
        assert reported["majority_share"] == round(counter.most_common(1)[0][1] / sum(counter.values()), 4)


def test_corpus_and_stats_cover_all_text(data_dir):
    corpus = set((data_dir / "corpus.txt").read_text(encoding="utf-8").splitlines())
    for split in ("train", "val"):
        assert {a["caption"] for a in read_json(data_dir / f"coco/annotations/captions_{split}.json")["annotations"]} <= corpus
        assert {q["question"] for q in read_json(data_dir / f"vqa/questions_{split}.json")["questions"]} <= corpus
        answers = read_json(data_dir / f"vqa/annotations_{split}.json")["annotations"]
        assert {a["answer"] for annotation in answers for a in annotation["answers"]} <= corpus
    stats = read_json(data_dir / "stats.json")
    assert stats["arguments"] == {"num_train": NUM_TRAIN, "num_val": NUM_VAL, "seed": 0, "samples_per_shard": PER_SHARD}
    assert stats["splits"]["train"]["images"] == NUM_TRAIN and stats["splits"]["train"]["shards"] == 3
    vocabulary = set(stats["vocabulary"])
    assert {"circle", "red", "background", "how", "yes"} <= vocabulary and len(vocabulary) < 100


def test_cli_skips_an_up_to_date_folder_unless_forced(tmp_path, capsys):
    out = tmp_path / "cli"
    arguments = ["--out", str(out), "--num-train", "6", "--num-val", "4"]
    synthetic.main(arguments)
    (out / "corpus.txt").write_text("edited\n")
    synthetic.main(arguments)
    assert "up to date" in capsys.readouterr().out
    assert (out / "corpus.txt").read_text() == "edited\n"
    synthetic.main(arguments + ["--force"])
    assert (out / "corpus.txt").read_text() != "edited\n"
    synthetic.main(["--out", str(out), "--num-train", "8", "--num-val", "4"])  # new arguments: regenerates
    assert read_json(out / "stats.json")["splits"]["train"]["images"] == 8


def test_bad_arguments_raise_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="num_train"):
        synthetic.generate(tmp_path / "zero", num_train=0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a synthetic data folder") as error:
        synthetic.generate(foreign, num_train=2, num_val=2)
    assert "\n" not in str(error.value)
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(foreign / "mine.txt"), "--num-train", "2", "--num-val", "2"])
    assert exit_info.value.code == 2
