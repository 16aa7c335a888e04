import json
import random
import warnings

import pytest
import torch
from PIL import Image

from seed_lightning.core.data.coco import coco_to_shards, main
from seed_lightning.core.data.datamodule import ShardDataModule
from seed_lightning.core.data.shards import decode_image_sample, iter_tar_samples
from seed_lightning.core.data.transforms import ImageTransform
from seed_lightning.core.errors import ConfigError, DataError


@pytest.fixture
def images(tmp_path):
    """Three COCO-named images under images/val2014 (one PNG)."""
    folder = tmp_path / "images" / "val2014"
    folder.mkdir(parents=True)
    for image_id, image_format in [(1, "JPEG"), (22, "PNG"), (333, "JPEG")]:
        suffix = "png" if image_format == "PNG" else "jpg"
        Image.new("RGB", (20 + image_id % 7, 16), (image_id % 256, 0, 0)).save(
            folder / f"COCO_val2014_{image_id:012d}.{suffix}", format=image_format
        )
    return tmp_path / "images"


def file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.{'png' if image_id == 22 else 'jpg'}"


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def coco_captions(tmp_path):
    return write_json(
        tmp_path / "captions_val2014.json",
        {
            "images": [
                {"id": i, "file_name": f"val2014/{file_name(i)}", "width": 20 + i % 7, "height": 16}
                for i in (1, 22, 333)
            ],
            "annotations": [
                {"id": 10, "image_id": 1, "caption": "A red square."},
                {"id": 11, "image_id": 22, "caption": "Another red square"},
                {"id": 12, "image_id": 1, "caption": "A small picture. "},
                {"id": 13, "image_id": 333, "caption": "Third image"},
            ],
        },
    )


@pytest.fixture
def karpathy(tmp_path):
    def entry(image_id, split, captions):
        return {
            "filepath": "val2014",
            "filename": file_name(image_id),
            "split": split,
            "cocoid": image_id,
            "imgid": image_id + 1000,
            "sentences": [{"raw": caption, "tokens": caption.lower().split()} for caption in captions],
        }

    return write_json(
        tmp_path / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                entry(1, "train", ["one a", "one b"]),
                entry(22, "test", ["two a"]),
                entry(333, "restval", ["x"]),
            ],
        },
    )


def read_back(shards: list[str]) -> list[dict]:
    return [sample for url in shards for sample in iter_tar_samples(url)]


def test_coco_captions_to_per_caption_training_shards(tmp_path, images, coco_captions):
    shards = coco_to_shards(images, coco_captions, tmp_path / "out", prefix="train", per_image=False, maxcount=3).shards
    assert shards == [str(tmp_path / "out" / f"train-{i:06d}.tar") for i in range(2)]
    samples = read_back(shards)
    assert [s["__key__"] for s in samples] == ["000000000001_0", "000000000001_1", "000000000022_0", "000000000333_0"]
    captions = [b"A red square.", b"A small picture. ", b"Another red square", b"Third image"]  # raw, uncleaned
    assert [s["txt"] for s in samples] == captions
    meta = json.loads(samples[0]["json"])
    assert meta == {
        "image_id": 1,
        "captions": ["A red square.", "A small picture. "],
        "file_name": f"val2014/{file_name(1)}",
        "width": 21,
        "height": 16,
    }
    assert samples[0]["jpg"] == (images / "val2014" / file_name(1)).read_bytes()  # original bytes
    assert samples[2]["png"] == (images / "val2014" / file_name(22)).read_bytes()
    decoded = decode_image_sample(samples[2], random.Random(0), ImageTransform(image_size=8))
    assert decoded["caption"] == "another red square" and decoded["pixel_values"].shape == (3, 8, 8)


def test_karpathy_split_to_per_image_eval_shards(tmp_path, images, karpathy):
    samples = read_back(coco_to_shards(images, karpathy, tmp_path / "out", per_image=True, split="test").shards)
    assert [s["__key__"] for s in samples] == ["000000000022"]
    meta = json.loads(samples[0]["json"])
    assert meta == {"image_id": 22, "captions": ["two a"], "file_name": f"val2014/{file_name(22)}"}
    report = coco_to_shards(images, karpathy, tmp_path / "tr", per_image=False, split="train,restval")
    samples = read_back(report.shards)
    assert [s["__key__"] for s in samples] == ["000000000001_0", "000000000001_1", "000000000333_0"]
    assert [s["txt"] for s in samples] == [b"one a", b"one b", b"x"]


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ("{not json", DataError, "not valid JSON"),
        ('{"something": []}', DataError, "no 'images' list"),
        ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}', DataError, "no captioned images"),
        ('{"images": [{"filename": "x.jpg", "imgid": 0, "sentences": []}]}', DataError, "no captioned images"),
        ('{"images": [{"split": "test"}]}', DataError, "lacks 'filename'"),
    ],
)
def test_bad_annotation_files_are_one_line_data_errors(tmp_path, images, content, error, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(error, match=message) as raised:
        coco_to_shards(images, tmp_path / "bad.json", tmp_path / "out", split=None)
    assert "\n" not in str(raised.value)


def test_converter_errors_name_the_problem(tmp_path, images, coco_captions, karpathy):
    with pytest.raises(DataError, match="cannot read annotation file"):
        coco_to_shards(images, tmp_path / "missing.json", tmp_path / "out")
    with pytest.raises(DataError, match=f"1 of 3 images .*{file_name(22)}"):
        (images / "val2014" / file_name(22)).unlink()
        coco_to_shards(images, coco_captions, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before writing anything
    with pytest.raises(ConfigError, match="only applies to Karpathy"):
        coco_to_shards(images, coco_captions, tmp_path / "out", split="test")
    with pytest.raises(ConfigError, match="unknown Karpathy split"):
        coco_to_shards(images, karpathy, tmp_path / "out", split="testing")


def test_cli_writes_shards_and_reports_errors_in_one_line(tmp_path, images, karpathy, capsys):
    out = tmp_path / "cli"
    assert main(["--image-dir", str(images), "--annotations", karpathy, "--out-dir", str(out), "--per-image"]) == 0
    assert [s["__key__"] for s in read_back([str(out / "coco-000000.tar")])] == [f"{i:012d}" for i in (1, 22, 333)]
    capsys.readouterr()
    assert main(["--image-dir", str(images), "--annotations", karpathy, "--out-dir", str(out), "--split", "bogus"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def odd_images(folder) -> dict[str, bool]:
    """Image files in formats the shard readers do not take, plus unreadable ones: name -> PIL can read it."""
    folder.mkdir(parents=True)
    frames = [Image.new("P", (12, 10), index) for index in (1, 2)]
    for frame in frames:
        frame.putpalette([value for index in range(256) for value in (index, 255 - index, 7)])
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], transparency=2)
    Image.new("RGB", (9, 7), (10, 200, 30)).save(folder / "photo.bmp")
    Image.new("CMYK", (8, 8), (0, 128, 255, 10)).save(folder / "print.tif")  # PNG cannot hold CMYK
    Image.frombytes("I;16", (6, 5), bytes(range(60))).save(folder / "scan.tiff")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "photo.jpg")
    (folder / "garbage.gif").write_bytes(b"GIF89a" + bytes(50))
    jpeg = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return {"animated.gif": True, "photo.bmp": True, "print.tif": True, "scan.tiff": True, "photo.jpg": True,
            "garbage.gif": False, "truncated.jpg": False}


def test_every_image_pil_reads_reaches_training_and_the_rest_is_reported(tmp_path, capsys):
    files = odd_images(tmp_path / "images")
    annotations = write_json(tmp_path / "captions.json", {
        "images": [{"id": image_id, "file_name": name} for image_id, name in enumerate(files)],
        "annotations": [{"id": image_id, "image_id": image_id, "caption": f"picture {name}"}
                        for image_id, name in enumerate(files)],
    })
    out = tmp_path / "shards"
    assert main(["--image-dir", str(tmp_path / "images"), "--annotations", annotations, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 images (5 samples) into 1 shard(s)" in printed
    assert "re-encoded as PNG" in printed and "TIFF 2" in printed and "GIF 1" in printed and "BMP 1" in printed
    assert "left out 2 images PIL cannot read" in printed
    assert "garbage.gif (not a format PIL reads)" in printed and "truncated.jpg" in printed

    data = ShardDataModule(val=str(out / "coco-000000.tar"), image_size=8, val_batch_size=8, num_workers=0)
    data.setup("validate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped
        (batch,) = list(data.val_dataloader())
    names = [meta["file_name"] for meta in batch["meta"]]
    assert names == [name for name, readable in files.items() if readable]
    transform = ImageTransform(image_size=8, train=False)
    for name, pixels in zip(names, batch["pixel_values"]):  # the pixels of the original file
        assert torch.equal(pixels, transform(Image.open(tmp_path / "images" / name), random.Random(0))), name


def test_converter_fails_when_no_image_can_be_read(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.gif").write_bytes(b"not an image")
    annotations = write_json(tmp_path / "captions.json", {
        "images": [{"id": 1, "file_name": "a.gif"}], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]})
    with pytest.raises(DataError, match="none of the 1 images could be read by PIL.*a.gif"):
        coco_to_shards(tmp_path / "images", annotations, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
