"""ImageDecoder: generation embeddings -> PIL images through a tiny Stable Diffusion, deterministically."""

import numpy as np
import pytest
import torch

from devkit import tiny_models
from devkit.tiny_models import TINY
from seed_lightning.core.errors import ConfigError, DataError
from seed_lightning.tokenizer.image_decoder import ImageDecoder

CORPUS = ["a red circle at the top", "two small blue squares on a white background", "a green star"]


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    tiny_models.build_tiny_sd(CORPUS, folder)
    return folder


@pytest.fixture(scope="module")
def decoder(tiny_sd_dir):
    return ImageDecoder.from_pretrained(tiny_sd_dir, num_inference_steps=3, seed=42)


def embeddings(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, TINY.sd_max_length, TINY.sd_text_hidden_size, generator=torch.Generator().manual_seed(seed))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_decodes_one_image_per_embedding_at_the_sd_resolution(decoder):
    images = decoder(embeddings(2))
    assert len(images) == 2
    assert all(image.size == (TINY.sd_image_size, TINY.sd_image_size) and image.mode == "RGB" for image in images)
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() > 0, "different conditioning, different images"


def test_same_seed_same_image_regardless_of_batch(decoder):
    first = decoder(embeddings(2))
    again = decoder(embeddings(2))
    alone = decoder(embeddings(2)[1:])
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    # Per-image generators: image 1 of a batch equals that embedding decoded on its own.
    assert np.abs(pixels(first[1]) - pixels(alone[0])).max() <= 1


def test_other_seed_other_image(decoder):
    default, other = decoder(embeddings(1)), decoder(embeddings(1), seeds=[7])
    assert np.abs(pixels(default[0]) - pixels(other[0])).max() > 0


def test_unconditional_embedding_is_the_text_encoder_on_empty_prompt(decoder):
    pipeline = decoder.pipeline
    tokens = pipeline.tokenizer([""], padding="max_length", max_length=TINY.sd_max_length, return_tensors="pt")
    with torch.no_grad():
        expected = pipeline.text_encoder(tokens.input_ids).last_hidden_state
    torch.testing.assert_close(decoder.unconditional_embedding(), expected)


def test_rejects_wrong_width_and_seed_count(decoder):
    with pytest.raises(DataError, match="out_dim"):
        decoder(torch.zeros(1, TINY.sd_max_length, TINY.sd_text_hidden_size + 1))
    with pytest.raises(DataError, match="one seed per image"):
        decoder(embeddings(2), seeds=[1])


def test_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Stable Diffusion"):
        ImageDecoder.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("path", ["no such/sd", "~/no-such-sd"])
def test_a_missing_folder_that_cannot_be_a_hub_id_is_named_as_missing(path):
    """Hub ids are told from paths as preflight tells them (`is_hub_id`): these never reach the hub."""
    with pytest.raises(ConfigError, match=f"Stable Diffusion folder '{path}' does not exist"):
        ImageDecoder.from_pretrained(path)
