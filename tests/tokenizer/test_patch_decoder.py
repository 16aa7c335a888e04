"""The tiny decoder of the default world (a PatchDecoder network) behind the ImageDecoder interface."""

import numpy as np
import pytest
import torch

from seed_lightning.core.errors import ConfigError, DataError
from seed_lightning.tokenizer.image_decoder import ImageDecoder, TinyImageDecoder, check_image_decoder
from seed_lightning.tokenizer.patch_decoder import PatchDecoder, PatchDecoderConfig

CONFIG = PatchDecoderConfig(embedding_dim=16, image_size=32, grid_size=4, hidden_size=32, patch_channels=8,
                            patch_hidden_size=16)


def embeddings(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 77, CONFIG.embedding_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    decoder = PatchDecoder(CONFIG)
    decoder.save_pretrained(tmp_path / "tiny-decoder")
    return decoder, tmp_path / "tiny-decoder"


def test_image_decoder_loads_a_tiny_decoder_folder_that_draws_as_saved(saved):
    decoder, folder = saved
    loaded = ImageDecoder.from_pretrained(folder, num_inference_steps=3)  # sampling settings do not apply
    assert isinstance(loaded, TinyImageDecoder) and loaded.embedding_dim == CONFIG.embedding_dim
    images = loaded(embeddings(2))
    assert [(image.size, image.mode) for image in images] == [((32, 32), "RGB")] * 2
    with torch.no_grad():
        expected = decoder(embeddings(2)).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack([np.asarray(image) for image in images]), expected)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1])), "other embeddings, other image"


def test_deterministic_whatever_the_seeds_and_batch(saved):
    _, folder = saved
    decoder = ImageDecoder.from_pretrained(folder)
    batch = decoder(embeddings(2), seeds=[1, 2])
    alone = decoder(embeddings(2)[1:], seeds=[7])
    assert np.abs(np.asarray(batch[1], dtype=np.int16) - np.asarray(alone[0], dtype=np.int16)).max() <= 1


def test_rejects_embeddings_of_another_width_or_length(saved):
    _, folder = saved
    decoder = ImageDecoder.from_pretrained(folder)
    with pytest.raises(DataError, match="out_dim"):
        decoder(torch.zeros(1, 77, CONFIG.embedding_dim + 1))
    with pytest.raises(DataError, match="full context"):
        decoder(torch.zeros(1, 76, CONFIG.embedding_dim))


def test_preflight_accepts_a_tiny_decoder_folder_and_names_a_missing_one(saved, tmp_path):
    _, folder = saved
    check_image_decoder(str(folder), "sd_path")
    with pytest.raises(ConfigError, match="sd_path: folder .*nowhere does not exist.*tiny decoder folder"):
        check_image_decoder(str(tmp_path / "nowhere"), "sd_path")


def test_image_size_must_split_into_patches():
    with pytest.raises(ConfigError, match="multiple of grid_size"):
        PatchDecoderConfig(image_size=64, grid_size=6)
