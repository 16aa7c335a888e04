"""extract-tokens: image shards -> token shards, deterministic, resumable, rank-split, numbers from the tokenizer."""

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from seed_lightning import cli
from seed_lightning.core.data.shards import decode_codes_sample, iter_tar_samples
from seed_lightning.core.errors import ConfigError
from seed_lightning.mllm import extract
from seed_lightning.tokenizer.causal_qformer import CausalQFormerConfig
from seed_lightning.tokenizer.heads import GenerationHeadConfig, ReconstructionHeadConfig
from seed_lightning.tokenizer.model import SeedTokenizer, SeedTokenizerConfig
from seed_lightning.tokenizer.vision import VisionEncoderConfig

TINY_BLIP2 = str(Path(__file__).resolve().parents[2] / "data" / "models" / "tiny-blip2")
COLORS = [(220, 30, 30), (30, 170, 50), (30, 70, 220), (240, 210, 20), (20, 20, 20)]


def save_tokenizer(directory, num_codes: int = 64, seed: int = 0, num_queries: int | None = None) -> str:
    """A random SeedTokenizer on the tiny BLIP-2 folder with widened weights, so codes differ between images.
    `num_queries` (codes per image) other than the folder's gives a random Q-Former of its dims."""
    torch.manual_seed(seed)
    qformer = CausalQFormerConfig(pretrained=TINY_BLIP2)
    if num_queries is not None:
        qformer = dataclasses.replace(qformer.resolved(), pretrained=None, num_queries=num_queries)
    config = SeedTokenizerConfig(
        vision=VisionEncoderConfig(pretrained=TINY_BLIP2),
        qformer=qformer,
        num_codes=num_codes,
        recon_head=ReconstructionHeadConfig(depth=1, num_heads=4),
        gen_head=GenerationHeadConfig(depth=1, num_heads=4, qformer_layers=2, out_dim=64),
    )
    tokenizer = SeedTokenizer.from_config(config)
    with torch.no_grad():
        for module in tokenizer.qformer.qformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.3)
        tokenizer.quantizer.embedding.weight.normal_(std=0.3)
    tokenizer.save(directory)
    return str(directory)


def write_image_shards(directory, num_shards: int = 2, per_shard: int = 5, corrupt_key: str | None = None) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        with TarWriter(str(directory / f"img-{shard:06d}.tar"), mtime=0) as writer:
            for item in range(per_shard):
                key = f"{shard:03d}{item:03d}"
                image = Image.new("RGB", (40 + item, 30), COLORS[(shard + item) % len(COLORS)])
                image.paste((255, 255, 255), (item * 5, 0, item * 5 + 10, 10 + shard * 10))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = b"not an image" if key == corrupt_key else buffer.getvalue()
                meta = {"image_id": shard * 100 + item, "captions": [f"caption {key}", f"other {key}"]}
                writer.write({"__key__": key, "png": data, "txt": f"caption {key}", "json": meta})
    return str(directory / f"img-{{000000..{num_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_image_shards(tmp_path_factory.mktemp("images"))


def run(tokenizer_dir, shards, out, **kwargs):
    options = {"batch_size": 3, "maxcount": 4, "device": "cpu", "progress": False, **kwargs}
    return extract.extract_split(tokenizer_dir, shards, out, "train", **options)


def read_all(paths, codes_per_image: int = 32) -> list[dict]:
    """The samples as the data module reads them."""
    return [decode_codes_sample(raw, None, codes_per_image) for path in paths for raw in iter_tar_samples(str(path))]


def test_every_image_once_with_its_codes_caption_and_meta(tokenizer_dir, shards, tmp_path):
    summary = run(tokenizer_dir, shards, tmp_path / "tokens")
    samples = read_all(summary.shards)
    assert [s["key"] for s in samples] == [f"{s:03d}{i:03d}" for s in range(2) for i in range(5)]
    assert [p.name for p in summary.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert samples[3]["caption"] == "caption 000003" and samples[3]["meta"]["image_id"] == 3
    assert samples[7]["meta"]["captions"] == ["caption 001002", "other 001002"]
    tokenizer = SeedTokenizer.load(tokenizer_dir).eval()
    image = Image.new("RGB", (42, 30), COLORS[2])
    image.paste((255, 255, 255), (10, 0, 20, 10))
    expected = tokenizer.encode(tokenizer.preprocess([image]))[0]
    assert torch.equal(samples[2]["codes"], expected), "codes are the tokenizer's eval-transform codes of the image"
    assert len({tuple(s["codes"].tolist()) for s in samples}) > 1


def test_extraction_is_deterministic(tokenizer_dir, shards, tmp_path):
    first = run(tokenizer_dir, shards, tmp_path / "a")
    second = run(tokenizer_dir, shards, tmp_path / "b")
    assert [p.read_bytes() for p in first.shards] == [p.read_bytes() for p in second.shards]


def test_an_interrupted_extraction_resumes_without_duplicates_or_gaps(tokenizer_dir, shards, tmp_path, monkeypatch):
    clean = run(tokenizer_dir, shards, tmp_path / "clean")
    original_encode = SeedTokenizer.encode
    calls = {"n": 0}

    def failing_encode(self, pixel_values):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original_encode(self, pixel_values)

    monkeypatch.setattr(SeedTokenizer, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        run(tokenizer_dir, shards, tmp_path / "resumed")
    monkeypatch.setattr(SeedTokenizer, "encode", original_encode)
    assert [p.name for p in (tmp_path / "resumed").glob("*.tar")] == ["train-000000.tar"], "one full shard kept"
    resumed = run(tokenizer_dir, shards, tmp_path / "resumed")
    assert resumed.num_resumed == 4
    assert [p.read_bytes() for p in resumed.shards] == [p.read_bytes() for p in clean.shards]


def test_ranks_split_the_shards_and_write_their_own_prefix(tokenizer_dir, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = run(tokenizer_dir, shards, tmp_path / "tokens")
    samples = read_all(summary.shards)
    assert [s["key"] for s in samples] == [f"001{i:03d}" for i in range(5)], "rank 1 takes the second shard"
    assert all(p.name.startswith("train-rank1-") for p in summary.shards)


def test_unusable_images_are_skipped(tokenizer_dir, tmp_path):
    shards = write_image_shards(tmp_path / "images", num_shards=1, corrupt_key="000002")
    summary = run(tokenizer_dir, shards, tmp_path / "tokens")
    assert [s["key"] for s in read_all(summary.shards)] == ["000000", "000001", "000003", "000004"]


def test_extraction_skips_what_the_training_loaders_skip(tokenizer_dir, tmp_path, capsys):
    """The loaders' rules (`decode_image_sample`) decide, so no token sample stands for an image training would drop."""
    image = io.BytesIO()
    Image.new("RGB", (40, 30), COLORS[0]).save(image, format="PNG")
    samples = {
        "good": {"png": image.getvalue(), "txt": "a red square"},
        "nocaption": {"png": image.getvalue(), "txt": "..."},  # nothing left after cleaning
        "listmeta": {"png": image.getvalue(), "txt": "a red square", "json": b"[1, 2]"},  # meta must be an object
        "noimage": {"txt": "a red square"},
    }
    (tmp_path / "images").mkdir()
    with TarWriter(str(tmp_path / "images" / "img-000000.tar"), mtime=0) as writer:
        for key, members in samples.items():
            writer.write({"__key__": key, **members})
    summary = run(tokenizer_dir, str(tmp_path / "images" / "img-000000.tar"), tmp_path / "tokens")
    assert [s["key"] for s in read_all(summary.shards)] == ["good"]
    skipped = capsys.readouterr().err
    assert all(f"'{reason}': 1" in skipped for reason in ("empty_caption", "bad_json", "missing_image")), skipped


def test_tokens_of_another_tokenizer_are_not_mixed_in(tokenizer_dir, shards, tmp_path):
    run(tokenizer_dir, shards, tmp_path / "tokens")
    other = save_tokenizer(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="different tokenizer"):
        run(other, shards, tmp_path / "tokens")
    fresh = run(other, shards, tmp_path / "fresh")
    replaced = run(other, shards, tmp_path / "tokens", replace_stale=True)
    assert replaced.num_resumed == 0
    assert [p.read_bytes() for p in replaced.shards] == [p.read_bytes() for p in fresh.shards]


def test_command_line_takes_the_codes_per_image_from_the_tokenizer(shards, tmp_path, capsys):
    tokenizer = save_tokenizer(tmp_path / "tokenizer", num_queries=16)
    argv = ["extract-tokens", "--tokenizer", tokenizer, "--shards", shards, "--out", str(tmp_path / "t"),
            "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert "10 samples in 1 token shards" in capsys.readouterr().out
    assert json.loads((tmp_path / "t" / "tokens-tokenizer.json").read_text())["tokenizer"] == tokenizer
    samples = read_all(sorted((tmp_path / "t").glob("tokens-*.tar")), codes_per_image=16)
    assert len(samples) == 10 and all(s["codes"].shape == (16,) for s in samples)
    assert "--config" not in extract.build_parser().format_help(), "numbers come from the tokenizer, not an LM config"


def test_command_line_error_for_a_missing_tokenizer(shards, tmp_path, capsys):
    assert cli.main(["extract-tokens", "--tokenizer", str(tmp_path / "nope"), "--shards", shards,
                     "--out", str(tmp_path / "t")]) == 2
    error = capsys.readouterr().err.strip()
    assert "is not a saved SeedTokenizer" in error and len(error.splitlines()) == 1
