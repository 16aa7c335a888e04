"""The tiny CLIP of `make data`: trained on synthetic data, it scores matching captions above others."""

import pytest
import torch

from devkit import synthetic, tiny_clip
from seed_lightning.core.clip_score import CLIPScorer, clip_score


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "synthetic"
    synthetic.generate(folder, num_train=300, num_val=32)
    return folder


@pytest.mark.slow  # ~20 s of CPU: trains for 40 steps
def test_held_out_matched_pairs_score_above_mismatched(data, tmp_path):
    settings = tiny_clip.TinyCLIPSettings(steps=40, batch_size=64)
    out = tmp_path / "tiny-clip"
    matched, mismatched = tiny_clip.build_tiny_clip(data, out, settings)
    assert matched > mismatched + 20, (matched, mismatched)

    # The saved folder is what CLIPScorer (and torchmetrics through it) loads, and it agrees with training.
    scorer = CLIPScorer(str(out))
    pairs = tiny_clip.read_pairs(str(data / "shards" / "val-*.tar"), scorer.processor)
    with torch.no_grad():
        image_features = scorer.model.get_image_features(pixel_values=pairs.pixel_values)
    texts = [captions[0] for captions in pairs.captions]
    text_features = scorer.text_features(texts)
    assert float(clip_score(image_features, text_features)) == pytest.approx(matched, abs=0.05)


def test_main_skips_an_existing_folder(tmp_path, capsys):
    (tmp_path / "tiny-clip").mkdir()
    assert tiny_clip.main(["--data", str(tmp_path), "--out", str(tmp_path / "tiny-clip")]) == 0
    assert "exists" in capsys.readouterr().out


def test_main_reports_missing_data_in_one_line(tmp_path, capsys):
    assert tiny_clip.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "tiny-clip")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "tiny-clip").exists()
