"""The tiny decoder of `make data`: canonical targets, a build that learns, and the default one beats an untrained
one on the default val set."""

import numpy as np
import pytest
import torch

from devkit import generation_report, synthetic, tiny_decoder, tiny_models
from devkit.synthetic import Scene, SceneObject
from seed_lightning.core.clip_score import CLIPScorer
from seed_lightning.tokenizer.image_decoder import ImageDecoder
from seed_lightning.tokenizer.patch_decoder import PatchDecoderConfig
from seed_lightning.tokenizer.sd_text_encoder import SDTextEncoder

SCENE = Scene(120, 90, "white", (
    SceneObject("circle", "red", "small", row=0, col=2),
    SceneObject("square", "blue", "large", row=2, col=0),
    SceneObject("square", "blue", "large", row=2, col=1),
))


def placed(scene: Scene) -> list[tuple[str, str, int, int]]:
    return [(obj.shape, obj.color, obj.row, obj.col) for obj in scene.objects]


def test_canonical_scene_keeps_what_the_caption_says_and_fixes_the_rest():
    # Rows given: their rows; columns: caption order, centred (3 objects: all three columns).
    caption = "two large blue squares at the bottom and a small red circle at the top on a white background"
    scene = tiny_decoder.canonical_scene(SCENE, caption, 64)
    assert (scene.width, scene.height, scene.background) == (64, 64, "white")
    assert placed(scene) == [("square", "blue", 2, 0), ("square", "blue", 2, 1), ("circle", "red", 0, 2)]
    # No rows given: the middle row, in the caption's order.
    caption = "a white background with a small red circle and two large blue squares"
    assert placed(tiny_decoder.canonical_scene(SCENE, caption, 64)) == [
        ("circle", "red", 1, 0), ("square", "blue", 1, 1), ("square", "blue", 1, 2)]
    # One object, two: centred.
    one = Scene(80, 80, "gray", (SceneObject("star", "green", "small", row=0, col=0),))
    assert placed(tiny_decoder.canonical_scene(one, "a small green star at the top on a gray background", 64)) == [
        ("star", "green", 0, 1)]
    two = Scene(80, 80, "gray", SCENE.objects[:2])
    caption = "a picture of a small red circle at the top and a large blue square at the bottom against a gray background"
    assert placed(tiny_decoder.canonical_scene(two, caption, 64)) == [("circle", "red", 0, 0), ("square", "blue", 2, 2)]


def test_a_caption_of_another_scene_is_a_data_error():
    with pytest.raises(tiny_decoder.DataError, match="does not describe its scene"):
        tiny_decoder.canonical_scene(SCENE, "a small green star on a gray background", 64)


@pytest.mark.slow  # ~45 s: a small world, a small tiny SD, 200 steps
def test_build_learns_and_saves_a_folder_both_decoder_and_text_encoder_load_from(tmp_path):
    data = tmp_path / "synthetic"
    synthetic.generate(data, num_train=200, num_val=8)
    sd = tmp_path / "tiny-sd"
    torch.manual_seed(0)
    tiny_models.build_tiny_sd(tiny_models.read_corpus(data / "corpus.txt"), sd)
    settings = tiny_decoder.TinyDecoderSettings(
        decoder=PatchDecoderConfig(image_size=32, grid_size=4, hidden_size=128, patch_channels=16), steps=200,
        batch_size=16)
    trained, untrained = tiny_decoder.build_tiny_decoder(data, sd, tmp_path / "tiny-decoder", settings)
    # 200 train images generalise a little to 8 held-out scenes; the default world's margin is the test below.
    assert trained < 0.95 * untrained, (trained, untrained)

    decoder = ImageDecoder.from_pretrained(tmp_path / "tiny-decoder")
    text_encoder = SDTextEncoder.from_pretrained(tmp_path / "tiny-decoder")  # usable as generation_target
    (image,) = decoder(text_encoder(["a large red circle on a black background"]))
    assert image.size == (32, 32)


def test_main_skips_an_existing_folder(tmp_path, capsys):
    (tmp_path / "tiny-decoder").mkdir()
    assert tiny_decoder.main(["--data", str(tmp_path), "--out", str(tmp_path / "tiny-decoder")]) == 0
    assert "exists" in capsys.readouterr().out


def test_main_reports_missing_data_in_one_line(default_world, tmp_path, capsys):
    out = tmp_path / "tiny-decoder"
    assert tiny_decoder.main(["--data", str(tmp_path / "nowhere"), "--sd", str(default_world.models / "tiny-sd"),
                              "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1 and not out.exists()


def test_the_default_decoder_draws_the_default_world_far_better_than_an_untrained_one(default_world):
    decoder_dir, clip_dir = default_world.models / "tiny-decoder", default_world.models / "tiny-clip"
    assert decoder_dir.is_dir() and clip_dir.is_dir(), "run `make data` first: it trains both"
    val = generation_report.read_val_images(str(default_world.shards / "val-*.tar"), 64)
    trained, untrained = generation_report.decoder_scores(str(decoder_dir), CLIPScorer(str(clip_dir)), val, seed=0)
    print(f"\nCLIP score of the decoder's images of 64 val captions: trained {trained:.1f}, untrained {untrained:.1f}")
    assert trained > untrained + 10, (trained, untrained)

    # And it draws the colours a caption names: the caption's background fills the corners.
    (image,) = ImageDecoder.from_pretrained(decoder_dir)(
        SDTextEncoder.from_pretrained(decoder_dir)(["a large red circle in the middle on a black background"]))
    corner = np.asarray(image)[:4, :4].reshape(-1, 3).mean(0)
    assert np.abs(corner - synthetic.BACKGROUNDS["black"]).max() < 40, corner
