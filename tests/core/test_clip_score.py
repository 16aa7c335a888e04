"""CLIP score: hand computation, and equality with torchmetrics' CLIPScore on a tiny random CLIP."""

import pytest
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from seed_lightning.core.clip_score import CLIPScorer, clip_score, image_image_similarity
from seed_lightning.core.errors import ConfigError, DataError


def test_clip_score_by_hand():
    image_features = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    text_features = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, -1.0]])
    # cosines 1, 1/sqrt(2), -1 -> mean of 100 * cos = 100 * (1 + 0.70710678 - 1) / 3
    expected = 100 * (1 + 2**-0.5 - 1) / 3
    assert clip_score(image_features, text_features).item() == pytest.approx(expected, rel=1e-6)
    assert image_image_similarity(image_features, text_features).item() == pytest.approx(expected, rel=1e-6)


def test_clip_score_clamps_the_mean_at_zero():
    # torchmetrics clamps the mean, not each pair: mean(100, -100, -100) -> 0, not 33.3.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    assert clip_score(features, opposite).item() == 0.0
    assert clip_score(features, features).item() == pytest.approx(100.0)


def test_clip_score_rejects_mismatched_features():
    with pytest.raises(DataError, match=r"\[N, D\]"):
        clip_score(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(DataError, match=r"\[N, D\]"):
        clip_score(torch.ones(0, 4), torch.ones(0, 4))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIPModel + CLIPProcessor (byte-level BPE vocab without merges, 32 px images)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    end_of_text = vocab["<|endoftext|>"]
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": end_of_text, "pad_token_id": end_of_text}
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **special),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
    return CLIPScorer(str(tiny_clip_dir))


def random_images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 40, 48), dtype=torch.uint8, generator=generator)


CAPTIONS = ["a cat on a mat", "two dogs playing in the park", "a red bus", "food on a plate"]


def test_scorer_equals_torchmetrics_clip_score(scorer):
    images = random_images(4, seed=1)
    metric = scorer.torchmetrics_clip_score()
    metric.update(images[:2], CAPTIONS[:2])  # accumulated over two batches, like a validation loop
    metric.update(images[2:], CAPTIONS[2:])
    expected = metric.compute()
    # A random model: compare the unclamped mean too, so that a clamp at 0 cannot hide a difference.
    image_features, text_features = scorer.image_features(images), scorer.text_features(CAPTIONS)
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    assert metric.score.item() / 4 == pytest.approx(100 * cosine.mean().item(), abs=1e-4)
    assert scorer.score(images, CAPTIONS).item() == pytest.approx(expected.item(), abs=1e-4)


def test_image_similarity_equals_torchmetrics_and_is_100_for_identical_images(scorer):
    originals, reconstructions = random_images(3, seed=2), random_images(3, seed=3)
    metric = scorer.torchmetrics_clip_score()
    metric.update(originals, reconstructions)
    similarity = scorer.image_similarity(originals, reconstructions)
    assert similarity.item() == pytest.approx(metric.compute().item(), abs=1e-4)
    assert scorer.image_similarity(originals, originals).item() == pytest.approx(100.0, abs=1e-3)


def test_scorer_accepts_pil_images(scorer):
    images = random_images(2, seed=4)
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    torch.testing.assert_close(scorer.image_features(pil_images), scorer.image_features(images))


def test_scorer_bad_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CLIPScorer(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot load a CLIP model"):
        CLIPScorer(str(tmp_path))  # exists but holds no model
    with pytest.raises(ConfigError, match="does not exist"):
        CLIPScorer("no such/clip")  # cannot be a hub id (`is_hub_id`, as preflight decides): never asks the hub
