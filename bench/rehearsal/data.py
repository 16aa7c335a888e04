"""Small data sets in the real formats, at the paths the paper configs read (relative to the work dir).

    python -m bench.rehearsal.data --out WORK_DIR [--num-train 512] [--num-val 40]

- ``data/cc3m/cc3m-train-0000.tar`` ...: image-text WebDataset shards in the img2dataset layout
  (``KEY.jpg|png``, ``KEY.txt``, ``KEY.json`` with img2dataset's fields; 9-digit keys = shard + index);
- ``data/coco/images/val2014/COCO_val2014_*.jpg|png`` + ``data/coco/dataset_coco.json`` (Karpathy split file,
  5 captions per image), converted by the project's ``python -m seed_lightning.core.data.coco --per-image`` into
  ``data/coco/karpathy-val-000000..000004.tar`` (the shards the tokenizer configs validate on);
- ``data/vqav2/v2_OpenEnded_mscoco_val2014_questions.json`` + ``v2_mscoco_val2014_annotations.json``: VQAv2
  questions (10 human answers each) about the val images (the MLLM config's VQA callback files).

Images are the synthetic shapes world (``devkit.synthetic``) drawn at real photo sizes and in the
modes real crawls have, with sensor-like noise: RGB JPEGs of 500x375, 640x480, 1024x768 and a 375x500 portrait, a greyscale JPEG, RGB,
RGBA and palette PNGs, a 1600x1200 JPEG.
"""

import argparse
import dataclasses
import functools
import io
import json
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from devkit import synthetic

IMAGE_KINDS = (
    # (width, height, PIL mode, format): every 10 consecutive images cycle through these.
    (500, 375, "RGB", "JPEG"),
    (1024, 768, "RGB", "JPEG"),
    (640, 480, "RGB", "JPEG"),
    (375, 500, "RGB", "JPEG"),
    (640, 427, "L", "JPEG"),
    (800, 600, "RGB", "PNG"),
    (500, 333, "RGBA", "PNG"),
    (480, 640, "P", "PNG"),
    (1600, 1200, "RGB", "JPEG"),
    (500, 400, "RGB", "JPEG"),
)
VAL_SHARDS = 5
"""conf/tokenizer/seed_v1.yaml validates on data/coco/karpathy-val-{000000..000004}.tar."""
CAPTIONS_PER_VAL_IMAGE = 5
TRAIN_SAMPLES_PER_SHARD = 64
VAL_IMAGE_ID_OFFSET = 391_895  # COCO-like ids, distinct from the train keys
VAL_SHARD_PREFIX = "karpathy-val"
VQA_QUESTIONS = "data/vqav2/v2_OpenEnded_mscoco_val2014_questions.json"
VQA_ANNOTATIONS = "data/vqav2/v2_mscoco_val2014_annotations.json"


def train_shard_pattern(num_train: int) -> str:
    """Brace pattern of the train shards (relative to the work dir)."""
    last = (num_train - 1) // TRAIN_SAMPLES_PER_SHARD
    return f"data/cc3m/cc3m-train-{{0000..{last:04d}}}.tar"


def val_shard_pattern() -> str:
    return f"data/coco/{VAL_SHARD_PREFIX}-{{000000..{VAL_SHARDS - 1:06d}}}.tar"


@functools.cache
def _noise(width: int, height: int) -> Image.Image:
    return Image.effect_noise((width, height), 40).convert("RGB")


def draw(index: int, rng: random.Random, kinds: Sequence[tuple[int, int, str, str]] = IMAGE_KINDS,
         ) -> tuple[synthetic.Scene, bytes, str, int, int]:
    """(scene, encoded image, extension, width, height) of image `index` (its kind cycles through `kinds`)."""
    width, height, mode, image_format = kinds[index % len(kinds)]
    scene = dataclasses.replace(synthetic.sample_scene(rng), width=width, height=height)
    image = synthetic.render(scene, rng)
    # Sensor-like noise, so JPEGs are as large (and as slow to decode) as photos of that size, not flat drawings.
    image = Image.blend(image, _noise(width, height), 0.2)
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {"compress_level": 1}))
    return scene, buffer.getvalue(), "jpg" if image_format == "JPEG" else "png", width, height


def five_captions(scene: synthetic.Scene, rng: random.Random) -> list[str]:
    """CAPTIONS_PER_VAL_IMAGE references, distinct where the scene allows (COCO has 5 per image)."""
    captions: list[str] = []
    for _ in range(20):
        captions += [c for c in synthetic.describe(scene, rng) if c not in captions]
    return [captions[i % len(captions)] for i in range(CAPTIONS_PER_VAL_IMAGE)]


def image_text_samples(count: int, rng: random.Random, kinds: Sequence[tuple[int, int, str, str]] = IMAGE_KINDS,
                       per_shard: int = TRAIN_SAMPLES_PER_SHARD, first_shard: int = 0) -> Iterator[dict]:
    """`count` samples as img2dataset writes them (KEY.jpg|png, KEY.txt, KEY.json with its fields; 9-digit keys =
    shard + position, shards of `per_shard` from `first_shard` on) of drawn images whose kinds cycle through `kinds`."""
    for index in range(count):
        scene, image, extension, width, height = draw(index, rng, kinds)
        caption = synthetic.describe(scene, rng)[0]
        shard, position = divmod(index, per_shard)
        key = f"{first_shard + shard:05d}{position:04d}"
        meta = {  # img2dataset's per-sample fields
            "url": f"https://example.invalid/cc3m/{key}.{extension}", "caption": caption, "key": key,
            "status": "success", "error_message": None, "width": width, "height": height,
            "original_width": width, "original_height": height,
        }
        yield {"__key__": key, extension: image, "txt": caption.encode(), "json": json.dumps(meta).encode()}


def write_train(out: Path, num_train: int, seed: int) -> None:
    import webdataset

    shards = out / "data" / "cc3m"
    shards.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(shards / "cc3m-train-%04d.tar"), maxcount=TRAIN_SAMPLES_PER_SHARD,
                                verbose=0, encoder=False) as writer:
        for sample in image_text_samples(num_train, random.Random(f"rehearsal-train-{seed}")):
            writer.write(sample)


def write_val(out: Path, num_val: int, seed: int, python: str) -> None:
    rng = random.Random(f"rehearsal-val-{seed}")
    coco = out / "data" / "coco"
    image_dir = coco / "images" / "val2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    karpathy_images, questions, annotations = [], [], []
    for index in range(num_val):
        scene, image, extension, _, _ = draw(index, rng)
        image_id = VAL_IMAGE_ID_OFFSET + index
        file_name = f"COCO_val2014_{image_id:012d}.{extension}"
        (image_dir / file_name).write_bytes(image)
        captions = five_captions(scene, rng)
        sentences = [{"tokens": synthetic.caption_tokens(c), "raw": c, "imgid": index, "sentid": index * 10 + j}
                     for j, c in enumerate(captions)]
        karpathy_images.append({
            "filepath": "val2014", "filename": file_name, "imgid": index, "split": "val", "cocoid": image_id,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
        })
        for j, question in enumerate(synthetic.ask(scene, rng)):
            question_id = image_id * 1000 + j
            questions.append({"image_id": image_id, "question": question.question, "question_id": question_id})
            annotations.append({
                "question_id": question_id, "image_id": image_id, "question_type": question.question_type,
                "answer_type": question.answer_type, "multiple_choice_answer": question.answer,
                "answers": synthetic.human_answers(question, rng),
            })
    karpathy = coco / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": karpathy_images, "dataset": "coco"}))
    vqa_header = {"info": {"description": "seed-lightning rehearsal (synthetic shapes)"}, "license": {},
                  "data_type": "mscoco", "data_subtype": "val2014"}
    (out / VQA_QUESTIONS).parent.mkdir(parents=True, exist_ok=True)
    (out / VQA_QUESTIONS).write_text(json.dumps({**vqa_header, "task_type": "Open-Ended", "questions": questions}))
    (out / VQA_ANNOTATIONS).write_text(json.dumps({**vqa_header, "annotations": annotations}))
    # Through the project's converter, as a user converts COCO: one sample per image, VAL_SHARDS shards.
    per_shard = -(-num_val // VAL_SHARDS)
    subprocess.run([
        python, "-m", "seed_lightning.core.data.coco", "--image-dir", str(coco / "images"), "--annotations", str(karpathy),
        "--split", "val", "--per-image", "--out-dir", str(coco), "--prefix", VAL_SHARD_PREFIX,
        "--maxcount", str(per_shard),
    ], check=True)
    written = sorted(coco.glob(f"{VAL_SHARD_PREFIX}-*.tar"))
    if len(written) != VAL_SHARDS:
        raise RuntimeError(f"expected {VAL_SHARDS} val shards, the converter wrote {len(written)}: "
                           f"use a --num-val that fills {VAL_SHARDS} shards")


def generate(out: str | Path, num_train: int, num_val: int, seed: int = 0, python: str = sys.executable) -> None:
    out = Path(out)
    write_train(out, num_train, seed)
    write_val(out, num_val, seed, python)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rehearsal.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the rehearsal work dir (data/ is written under it)")
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=40, help=f"val images (fills {VAL_SHARDS} shards)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out, args.num_train, args.num_val, args.seed)
    print(f"train: {train_shard_pattern(args.num_train)}; val: {val_shard_pattern()}; VQA: {VQA_QUESTIONS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
