import pytest
import torch
from tests.core.test_pretrained import tiny_blip2_config
from transformers import BertConfig, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2VisionModel

from seed_lightning.core.errors import ConfigError
from seed_lightning.tokenizer.vision import VisionEncoder, VisionEncoderConfig

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_size=64)


def trunk_parameters(encoder):
    return [p for name, p in encoder.model.named_parameters() if not name.startswith("post_layernorm.")]


def test_output_is_post_layernorm_of_every_token():
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionEncoderConfig(**TINY))
    pixels = torch.randn(2, 3, 32, 32)
    out = encoder(pixels)
    assert out.shape == (2, (32 // 8) ** 2 + 1, 32)
    reference = encoder.model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(out, reference)
    assert encoder.model.config._attn_implementation == "sdpa"
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # a random tower still tells images apart


def test_frozen_trunk_gets_no_gradient_and_stays_in_eval():
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionEncoderConfig(**TINY))
    encoder.train()
    assert not encoder.model.training and not encoder.model.encoder.layers[0].training
    assert all(not p.requires_grad for p in trunk_parameters(encoder))
    assert all(p.requires_grad for p in encoder.ln_vision.parameters())

    encoder(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    assert all(p.grad is None for p in trunk_parameters(encoder))
    assert encoder.ln_vision.weight.grad is not None and encoder.ln_vision.weight.grad.abs().sum() > 0


def test_a_bf16_frozen_trunk_runs_in_bf16_outside_autocast_and_feeds_an_fp32_ln_vision():
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionEncoderConfig(**TINY))
    pixels = torch.randn(2, 3, 32, 32)
    reference = encoder(pixels)
    encoder.model.embeddings.to(torch.bfloat16)
    encoder.model.encoder.to(torch.bfloat16)
    seen = []
    encoder.model.encoder.layers[0].mlp.fc1.register_forward_hook(
        lambda module, args, out: seen.append((args[0].dtype, torch.is_autocast_enabled("cpu"))))
    with torch.autocast("cpu", torch.bfloat16):
        out = encoder(pixels)
    assert seen == [(torch.bfloat16, False)]
    assert out.dtype == torch.float32  # ln_vision (fp32, trained in stage 1) under autocast
    assert torch.nn.functional.cosine_similarity(out, reference, dim=-1).min() > 0.99
    out.pow(2).sum().backward()
    assert encoder.ln_vision.weight.grad is not None


def test_fully_frozen_output_needs_no_graph():
    encoder = VisionEncoder(VisionEncoderConfig(**TINY, train_ln_vision=False))
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder(torch.randn(1, 3, 32, 32)).requires_grad


def test_trainable_tower_trains():
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionEncoderConfig(**TINY, trainable=True))
    encoder.train()
    assert encoder.model.training
    encoder(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    assert all(p.grad is not None for p in trunk_parameters(encoder) if p.requires_grad)
    assert encoder.model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["retrieval", "generation_sharded", "vision_only"])
def test_pretrained_tower_matches_the_hf_model(tmp_path, kind):
    torch.manual_seed(0)
    config = tiny_blip2_config()
    config.vision_config.num_hidden_layers = 3  # differs from VisionEncoderConfig's dims: must come from the checkpoint
    if kind == "retrieval":
        hf_vision = (model := Blip2ForImageTextRetrieval(config)).vision_model
        model.save_pretrained(tmp_path)
    elif kind == "generation_sharded":
        hf_vision = (model := Blip2ForConditionalGeneration(config)).vision_model
        model.save_pretrained(tmp_path, max_shard_size="20KB")
    else:
        hf_vision = Blip2VisionModel(config.vision_config)
        hf_vision.save_pretrained(tmp_path)

    encoder = VisionEncoder.from_config(VisionEncoderConfig(pretrained=str(tmp_path)))
    assert encoder.config.num_layers == 3 and encoder.config.hidden_size == 32 and encoder.config.pretrained == str(tmp_path)
    hf_vision.post_layernorm.eps = 1e-5  # ln_vision's official epsilon, which Hugging Face's port does not use
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), hf_vision.eval()(pixel_values=pixels).last_hidden_state)


def test_ln_vision_has_the_official_epsilon_and_the_blocks_keep_theirs(tmp_path):
    Blip2ForImageTextRetrieval(tiny_blip2_config()).save_pretrained(tmp_path)
    assert tiny_blip2_config().vision_config.layer_norm_eps == 1e-6  # what Hugging Face gives post_layernorm
    random_tower = VisionEncoder(VisionEncoderConfig(**TINY))
    blip2_tower = VisionEncoder.from_config(VisionEncoderConfig(pretrained=str(tmp_path)))
    for encoder in (random_tower, blip2_tower):
        assert encoder.ln_vision.eps == 1e-5, "the official code's ln_vision is an nn.LayerNorm with the default epsilon"
        assert encoder.model.encoder.layers[0].layer_norm1.eps == 1e-6
    assert VisionEncoder(VisionEncoderConfig(**TINY, ln_vision_eps=1e-6)).ln_vision.eps == 1e-6


def test_non_blip2_checkpoint_is_rejected(tmp_path):
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a BLIP-2 checkpoint"):
        VisionEncoder.from_config(VisionEncoderConfig(pretrained=str(tmp_path)))
