"""COCO captions / Karpathy split files -> image shards (the layout ShardDataModule reads), and the annotation-file
helpers (`load_json`, `required_field`) that the VQAv2 reader (`seed_lightning.mllm.vqa.read_vqa`) shares.

    python -m seed_lightning.core.data.coco --image-dir coco/images --annotations dataset_coco.json \
        --split test --per-image --out-dir data/coco/shards --prefix coco-karpathy-test

JPEG, PNG and WebP files go into the shards byte for byte. Any other format PIL reads (GIF, BMP, TIFF, ...)
is re-encoded as PNG rather than stored under its own extension: every reader of the shard layout (the
shard decoder, extract-tokens, webdataset's decoders) looks for jpg/png/webp members only, and PNG is
lossless, so training sees the pixels PIL decodes from the original (its first frame). Images PIL cannot
read are left out and reported.
"""

import argparse
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from seed_lightning.core.data.shards import IMAGE_ERRORS
from seed_lightning.core.data.transforms import to_rgb
from seed_lightning.core.errors import ConfigError, DataError, run_command

KARPATHY_SPLITS = ("train", "restval", "val", "test")
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
"""PIL formats stored byte for byte, with the shard member extension they get (MPO: a camera JPEG)."""
FAILURES_SHOWN = 5
"""How many of the images that could not be read the converter names."""


@dataclass
class CaptionedImage:
    """One image and all its reference captions, from either annotation format."""

    image_id: int
    path: Path
    file_name: str
    captions: list[str]
    width: int | None = None
    height: int | None = None


def load_json(path: str | Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except OSError as error:
        raise DataError(f"cannot read {what} {str(path)!r}: {error.strerror or error}; check the path") from None
    except ValueError as error:
        raise DataError(f"{what} {str(path)!r} is not valid JSON ({error}); re-download or fix the file") from None


def required_field(entry: dict, key: str, where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where} lacks {key!r}: is it the right kind of annotation file?")
    return entry[key]


def read_caption_annotations(
    annotations: str | Path, image_dir: str | Path, split: str | None = None
) -> list[CaptionedImage]:
    """Images with captions from COCO caption JSON (images + annotations) or a Karpathy split file
    (images[{filepath?, filename, split, cocoid|imgid, sentences[{raw}]}], as dataset_coco.json / _flickr30k.json).

    `split` (Karpathy only) keeps the listed comma-separated splits, e.g. "train,restval". Images without any
    caption are left out. Order: as in the file.
    """
    data = load_json(annotations, "annotation file")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(
            f"annotation file {str(annotations)!r} has no 'images' list: give COCO captions or a Karpathy split file"
        )
    image_dir = Path(image_dir)
    if "annotations" in data:
        if split is not None:
            raise ConfigError(f"split={split!r} only applies to Karpathy split files; {annotations} is COCO format")
        return _coco_images(data, images, image_dir, str(annotations))
    return _karpathy_images(images, image_dir, split, str(annotations))


def _coco_images(data: dict, images: list, image_dir: Path, name: str) -> list[CaptionedImage]:
    captions: dict[int, list[str]] = {}
    for position, annotation in enumerate(data["annotations"]):
        where = f"{name}: annotations[{position}]"
        image_id = required_field(annotation, "image_id", where)
        captions.setdefault(image_id, []).append(required_field(annotation, "caption", where))
    records = []
    for position, image in enumerate(images):
        where = f"{name}: images[{position}]"
        image_id, file_name = required_field(image, "id", where), required_field(image, "file_name", where)
        if image_id in captions:
            size = image.get("width"), image.get("height")
            records.append(CaptionedImage(image_id, image_dir / file_name, file_name, captions[image_id], *size))
    return records


def _karpathy_images(images: list, image_dir: Path, split: str | None, name: str) -> list[CaptionedImage]:
    wanted = None if split is None else {part.strip() for part in split.split(",")}
    if wanted is not None and not wanted <= set(KARPATHY_SPLITS):
        raise ConfigError(f"unknown Karpathy split in {split!r}: use a comma-separated subset of {KARPATHY_SPLITS}")
    records = []
    for position, image in enumerate(images):
        where = f"{name}: images[{position}]"
        if wanted is not None and required_field(image, "split", where) not in wanted:
            continue
        file_name = required_field(image, "filename", where)
        relative = Path(image.get("filepath", "")) / file_name
        image_id = image["cocoid"] if "cocoid" in image else required_field(image, "imgid", where)
        sentences = required_field(image, "sentences", where)
        captions = [required_field(sentence, "raw", f"{where}.sentences") for sentence in sentences]
        if captions:
            records.append(CaptionedImage(image_id, image_dir / relative, str(relative), captions))
    return records


class ShardImage(NamedTuple):
    """One image as a shard member."""

    extension: str
    data: bytes
    reencoded_from: str | None
    """The original PIL format when the image was re-encoded as PNG, else None."""


def shard_image(path: Path) -> ShardImage:
    """The image file at `path` as a shard member: JPEG/PNG/WebP as they are, other formats re-encoded as PNG
    (see the module docstring). Raises OSError (or another of IMAGE_ERRORS) when PIL cannot decode the file."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        extension = KEPT_FORMATS.get(image.format)
        if extension is not None:
            image.draft("RGB", (1, 1))  # a JPEG then decodes at 1/8 scale, still reading all of its data
            image.load()
            return ShardImage(extension, data, None)
        image.load()
        encoded = io.BytesIO()
        try:
            image.save(encoded, format="PNG")
        except OSError:  # a mode PNG cannot hold (CMYK, float, ...): store it as training would read it
            encoded = io.BytesIO()
            to_rgb(image).save(encoded, format="PNG")
        return ShardImage("png", encoded.getvalue(), image.format)


@dataclass
class ConversionReport:
    """What `coco_to_shards` wrote and what it left out."""

    shards: list[str]
    """Paths of the written shards, in order."""
    images: int
    """Images written."""
    samples: int
    """Samples written (one per caption, or one per image with per_image)."""
    reencoded: Counter[str]
    """Original PIL format -> images re-encoded as PNG."""
    failures: list[tuple[str, str]]
    """(path, why) of every image PIL could not read: left out."""

    def summary(self) -> str:
        """What was converted and what could not be, for people (one line each)."""
        lines = [f"wrote {self.images} images ({self.samples} samples) into {len(self.shards)} shard(s): "
                 f"{self.shards[0]} ... {self.shards[-1]}"]
        if self.reencoded:
            formats = ", ".join(f"{name} {count}" for name, count in self.reencoded.most_common())
            lines.append(f"re-encoded as PNG (the shard readers take JPEG/PNG/WebP): {formats}")
        if self.failures:
            shown = "; ".join(f"{path} ({why})" for path, why in self.failures[:FAILURES_SHOWN])
            more = f" and {len(self.failures) - FAILURES_SHOWN} more" if len(self.failures) > FAILURES_SHOWN else ""
            lines.append(f"left out {len(self.failures)} images PIL cannot read: {shown}{more}")
        return "\n".join(lines)


def coco_to_shards(
    image_dir: str | Path,
    annotations: str | Path,
    out_dir: str | Path,
    prefix: str = "coco",
    per_image: bool = False,
    maxcount: int = 10_000,
    split: str | None = None,
    progress: bool = False,
) -> ConversionReport:
    """Write WebDataset shards `out_dir/prefix-000000.tar`, ... and report them (paths, counts, failures).

    Each sample: the image (KEY.jpg, KEY.png or KEY.webp, see the module docstring), KEY.txt (a caption) and
    KEY.json {image_id, captions (all of the image's), file_name, width, height (when known)}. per_image=False
    writes one sample per caption (training: KEY = image id + caption number); per_image=True one per image with
    its first caption in KEY.txt (evaluation: KEY = image id). Raises DataError when no image can be read.
    """
    if maxcount < 1:
        raise ConfigError(f"maxcount must be >= 1, got {maxcount}")
    records = read_caption_annotations(annotations, image_dir, split)
    if not records:
        raise DataError(f"no captioned images in {str(annotations)!r} (split={split!r}): check the file and split")
    missing = [record.path for record in records if not record.path.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(records)} images not found, e.g. {str(missing[0])!r}: check --image-dir"
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    report = ConversionReport(shards=[], images=0, samples=0, reencoded=Counter(), failures=[])
    import webdataset  # only the converter writes shards: readers need no webdataset

    with webdataset.ShardWriter(
        str(Path(out_dir) / f"{prefix}-%06d.tar"), maxcount=maxcount, post=report.shards.append, verbose=0, mtime=0.0
    ) as writer:
        for record in tqdm(records, desc="images", unit="img", disable=not progress):
            try:
                image = shard_image(record.path)
            except IMAGE_ERRORS as error:
                why = f"{type(error).__name__}: {error}"
                if isinstance(error, UnidentifiedImageError):
                    why = "not a format PIL reads"
                report.failures.append((str(record.path), why))
                continue
            if image.reencoded_from is not None:
                report.reencoded[image.reencoded_from] += 1
            meta = {"image_id": record.image_id, "captions": record.captions, "file_name": record.file_name}
            meta.update({name: getattr(record, name) for name in ("width", "height") if getattr(record, name)})
            image_key = f"{record.image_id:012d}" if isinstance(record.image_id, int) else str(record.image_id)
            samples = [(image_key, record.captions[0])] if per_image else [
                (f"{image_key}_{number}", caption) for number, caption in enumerate(record.captions)
            ]
            for key, caption in samples:
                writer.write({"__key__": key, image.extension: image.data, "txt": caption, "json": meta})
            report.images += 1
            report.samples += len(samples)
    if report.images == 0:
        for shard in report.shards:
            Path(shard).unlink()
        path, why = report.failures[0]
        raise DataError(f"none of the {len(records)} images could be read by PIL, e.g. {path!r} ({why}): "
                        "check --image-dir and the image files")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seed_lightning.core.data.coco",
        description="Convert COCO caption annotations or a Karpathy split file into WebDataset image shards.",
    )
    parser.add_argument("--image-dir", required=True, help="folder the annotation file's image paths are relative to")
    parser.add_argument("--annotations", required=True, help="captions_*.json (COCO) or dataset_coco.json (Karpathy)")
    parser.add_argument("--out-dir", required=True, help="folder to write the shards into")
    parser.add_argument("--prefix", default="coco", help="shard file prefix: PREFIX-000000.tar, ...")
    parser.add_argument("--per-image", action="store_true", help="one sample per image (evaluation), not per caption")
    parser.add_argument("--maxcount", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--split", default=None, help="Karpathy splits to keep, comma-separated (e.g. train,restval)")
    args = parser.parse_args(argv)

    def convert() -> None:
        report = coco_to_shards(
            args.image_dir, args.annotations, args.out_dir, args.prefix, args.per_image, args.maxcount, args.split, True
        )
        print(report.summary())

    return run_command(parser.prog, convert)


if __name__ == "__main__":
    sys.exit(main())
