import string

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from seed_lightning.core.errors import ConfigError
from seed_lightning.tokenizer.sd_text_encoder import SDTextEncoder


@pytest.fixture
def sd_dir(tmp_path):
    """A Stable Diffusion-style folder with a tiny CLIP text encoder and a character-level CLIP tokenizer."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(tmp_path / "text_encoder")
    return tmp_path


def test_captions_to_padded_hidden_states(sd_dir):
    encoder = SDTextEncoder.from_pretrained(sd_dir)
    assert encoder.hidden_size == 32
    captions = ["a cat", "", "dog " * 60]  # the last one is longer than 77 tokens: truncated
    out = encoder(captions)
    assert out.shape == (3, 77, 32) and not out.requires_grad

    ids = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")(captions[:1], padding="max_length", max_length=77).input_ids
    reference = CLIPTextModel.from_pretrained(sd_dir / "text_encoder")(input_ids=torch.tensor(ids)).last_hidden_state
    torch.testing.assert_close(out[:1], reference)
    assert (out[0] - out[1]).abs().amax() > 1e-4  # different captions, different conditioning


def test_text_encoder_is_frozen(sd_dir):
    encoder = SDTextEncoder.from_pretrained(str(sd_dir))
    encoder.train()
    assert not encoder.training and not encoder.text_model.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Stable Diffusion folder"):
        SDTextEncoder.from_pretrained(tmp_path / "nowhere")


def test_a_load_error_without_a_message_is_named_by_its_class(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(CLIPTextModel, "from_pretrained", fail)
    with pytest.raises(ConfigError, match=r"cannot load the SD text encoder from .* \(OSError\)"):
        SDTextEncoder.from_pretrained(tmp_path)
