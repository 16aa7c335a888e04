import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tests.core.test_pretrained import tiny_blip2_config
from transformers import Blip2ForImageTextRetrieval

from seed_lightning.core.data.transforms import CLIP_MEAN, CLIP_STD
from seed_lightning.core.errors import ConfigError
from seed_lightning.tokenizer.causal_qformer import CausalQFormerConfig
from seed_lightning.tokenizer.heads import GenerationHeadConfig, ReconstructionHeadConfig
from seed_lightning.tokenizer.model import SeedTokenizer, SeedTokenizerConfig, seed_checkpoint_key
from seed_lightning.tokenizer.vision import VisionEncoderConfig

QFORMER_DIMS = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=100, max_text_positions=32)


def tiny_config(vision=None, qformer=None) -> SeedTokenizerConfig:
    return SeedTokenizerConfig(
        vision=vision or VisionEncoderConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_size=64),
        qformer=qformer or CausalQFormerConfig(**QFORMER_DIMS, num_queries=8, embed_dim=16),
        num_codes=64,
        code_dim=8,
        recon_head=ReconstructionHeadConfig(depth=1, num_heads=2),
        gen_head=GenerationHeadConfig(depth=1, num_heads=2, qformer_layers=2, num_queries=7, out_dim=24),
    )


def image_dependent_codes(tokenizer: SeedTokenizer) -> SeedTokenizer:
    """At init every image gets nearly the same codes: a BERT-initialised (std 0.02) Q-Former barely
    sees the image and the U(-1/n, 1/n) codebook sits at 0. Widen both so codes differ between images."""
    with torch.no_grad():
        for module in tokenizer.qformer.qformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.3)
        tokenizer.quantizer.embedding.weight.normal_(std=0.3)
    return tokenizer


@pytest.fixture
def tokenizer():
    torch.manual_seed(0)
    return image_dependent_codes(SeedTokenizer(tiny_config())).eval()


def test_encode_and_decode_shapes_and_range(tokenizer):
    pixels = torch.randn(3, 3, 32, 32)
    codes = tokenizer.encode(pixels)
    assert codes.shape == (3, 8) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    assert len(codes.unique()) > 2
    assert not torch.equal(codes[0], codes[1])
    # encode = nearest codes of the training path
    torch.testing.assert_close(codes, tokenizer.quantize(tokenizer.causal_embeddings(pixels)).codes, rtol=0, atol=0)
    generation = tokenizer.decode(codes)
    assert generation.shape == (3, 7, 24)
    assert tokenizer.embed_codes(codes).shape == (3, 8, 32)


def test_straight_through_gradients_reach_the_encoder_side():
    torch.manual_seed(0)
    tokenizer = image_dependent_codes(SeedTokenizer(tiny_config())).train()
    causal = tokenizer.causal_embeddings(torch.randn(2, 3, 32, 32))
    quantized = tokenizer.quantize(causal)
    decoded = tokenizer.decode_task_layer(quantized.z_q)
    loss = tokenizer.recon_head(decoded).pow(2).mean() + tokenizer.gen_head(decoded).pow(2).mean()
    loss.backward()
    assert tokenizer.encode_task_layer[0].weight.grad.abs().sum() > 0
    assert tokenizer.qformer.query_tokens.grad.abs().sum() > 0
    assert tokenizer.qformer.qformer.encoder.layer[0].crossattention.attention.key.weight.grad.abs().sum() > 0
    assert tokenizer.vision.ln_vision.weight.grad is not None
    assert tokenizer.vision.model.encoder.layers[0].mlp.fc1.weight.grad is None  # the frozen trunk


def test_save_load_round_trip_without_the_pretrained_folder(tmp_path):
    torch.manual_seed(0)
    blip2 = Blip2ForImageTextRetrieval(tiny_blip2_config())
    blip2.query_tokens.data.normal_()
    blip2.save_pretrained(tmp_path / "blip2")
    pretrained = str(tmp_path / "blip2")
    config = tiny_config(VisionEncoderConfig(pretrained=pretrained), CausalQFormerConfig(pretrained=pretrained))
    tokenizer = image_dependent_codes(SeedTokenizer.from_config(config)).eval()
    torch.testing.assert_close(tokenizer.qformer.query_tokens, blip2.query_tokens)

    pixels = torch.randn(4, 3, 32, 32)
    codes = tokenizer.encode(pixels)
    generation = tokenizer.decode(codes)
    tokenizer.save(tmp_path / "export")
    shutil.rmtree(tmp_path / "blip2")

    saved = json.loads((tmp_path / "export" / "config.json").read_text())["config"]
    assert saved["vision"]["pretrained"] is None and saved["qformer"]["pretrained"] is None
    assert saved["qformer"]["num_queries"] == 8 and saved["vision"]["hidden_size"] == 32

    loaded = SeedTokenizer.load(tmp_path / "export").eval()
    assert loaded.config == tokenizer.config.standalone()
    assert torch.equal(loaded.encode(pixels), codes)
    torch.testing.assert_close(loaded.decode(codes), generation, rtol=0, atol=0)


def test_load_rejects_what_save_did_not_write(tmp_path):
    with pytest.raises(ConfigError, match="not a saved SeedTokenizer"):
        SeedTokenizer.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not written by SeedTokenizer.save"):
        SeedTokenizer.load(tmp_path)


def test_config_from_dict_round_trip_and_unknown_keys():
    config = tiny_config()
    data = json.loads(json.dumps(dataclasses.asdict(config)))
    assert SeedTokenizerConfig.from_dict(data) == config
    data["qformer"]["num_querys"] = 3
    with pytest.raises(ConfigError, match=r"config.qformer: unknown keys \['num_querys'\]"):
        SeedTokenizerConfig.from_dict(data)


def test_preprocess_resizes_converts_and_normalises(tokenizer):
    images = [
        Image.new("RGB", (50, 20), (255, 0, 128)),
        Image.new("L", (10, 10), 255),
        Image.new("RGBA", (64, 64), (0, 255, 0, 255)),
    ]
    pixels = tokenizer.preprocess(images)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    for image_index, rgb in enumerate([(255, 0, 128), (255, 255, 255), (0, 255, 0)]):
        expected = (torch.tensor(rgb) / 255 - mean) / std
        torch.testing.assert_close(pixels[image_index].mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)
    assert tokenizer.encode(pixels).shape == (3, 8)


def official_input(image: Image.Image) -> torch.Tensor:
    """The official SEED / BLIP-2 eval input, as its code computes it: convert("RGB") -> Resize((224, 224),
    bicubic) -> ToTensor (/255) -> Normalize(CLIP mean, CLIP std)."""
    rgb = np.array(image.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))
    pixels = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise in every channel: resampling and decoding differences all show."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    channels = [x, y, 255 - x, (x + y) / 2][: len(mode)]
    values = np.stack(channels, axis=-1) + rng.normal(0, 20, (height, width, len(mode)))
    return Image.fromarray(values.clip(0, 255).astype(np.uint8).squeeze(), mode)


def transparent_palette_png(path) -> None:
    image = photo(300, 200).quantize(64)
    image.info["transparency"] = image.getpixel((0, 0))  # one palette entry, over much of a corner, transparent
    image.save(path, transparency=image.info["transparency"])


@pytest.mark.parametrize(
    "kind",
    ["jpeg-file-lazy", "rgba-png-transparent", "palette-png-transparent", "greyscale", "rgb-in-memory"],
)
def test_preprocess_is_exactly_the_official_input_and_leaves_the_image_alone(kind, tmp_path):
    tokenizer = SeedTokenizer(tiny_config(VisionEncoderConfig(image_size=224, patch_size=32, hidden_size=32,
                                                              num_layers=1, num_heads=2, mlp_size=64)))
    path = tmp_path / "image.png"
    if kind == "jpeg-file-lazy":
        path = tmp_path / "photo.jpg"
        photo(1280, 853).save(path, quality=90)  # large enough for draft decoding to apply
    elif kind == "rgba-png-transparent":
        rgba = photo(320, 240, "RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize((320, 240)))  # from opaque to fully transparent
        rgba.save(path)
    elif kind == "palette-png-transparent":
        transparent_palette_png(path)
    elif kind == "greyscale":
        photo(300, 170, "L").save(path)
    else:
        photo(250, 250).save(path)
    image = Image.open(path)  # lazily opened, as a user's code would
    size, mode = image.size, image.mode
    pixels = tokenizer.preprocess([image])[0]
    assert image.size == size and image.mode == mode, "the caller's image is not changed"
    expected = official_input(Image.open(path))
    assert pixels.shape == (3, 224, 224)
    assert (pixels - expected).abs().max() == 0


def test_loaded_tokenizers_are_in_eval_mode_and_encode_decode_ignore_the_mode(tmp_path):
    torch.manual_seed(0)
    image_dependent_codes(SeedTokenizer(tiny_config())).save(tmp_path / "export")
    tokenizer = SeedTokenizer.load(tmp_path / "export")
    assert not any(module.training for module in tokenizer.modules())

    pixels = torch.randn(4, 3, 32, 32)
    reference_codes, reference_embeds = tokenizer.encode(pixels), tokenizer.decode(torch.arange(8).repeat(2, 1))
    tokenizer.train()
    modes = {name: module.training for name, module in tokenizer.named_modules()}
    assert modes["qformer"] and not modes["vision.model"]  # a frozen trunk stays in eval even under train()
    for _ in range(3):
        assert torch.equal(tokenizer.encode(pixels), reference_codes), "Q-Former dropout must be off in encode"
        torch.testing.assert_close(tokenizer.decode(torch.arange(8).repeat(2, 1)), reference_embeds, rtol=0, atol=0)
    assert {name: module.training for name, module in tokenizer.named_modules()} == modes, "the caller's modes"


# LAVIS-side names of this module's tensors, written from the reference code's module names.
_TO_LAVIS = [
    ("qformer.qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
    ("qformer.embeddings.", "Qformer.bert.embeddings."),
    ("qformer.qformer.encoder.", "Qformer.bert.encoder."),
    ("qformer.query_tokens", "query_tokens"),
    ("qformer.image_proj.", "vision_proj."),
    ("qformer.text_proj.", "text_proj."),
    ("vision.model.post_layernorm.", "ln_vision."),
    ("vision.model.", "visual_encoder."),
    ("quantizer.embedding.", "quantize.embedding."),
    ("recon_head.pos_embed", "pos_embed"),
    ("recon_head.blocks.", "blocks."),
    ("gen_head.blocks.pos_embed", "pos_embed_text"),
    ("gen_head.blocks.blocks.", "blocks_text."),
    ("gen_head.reverse_qformer.layernorm.", "Reverse_Qformer.bert.embeddings.LayerNorm."),
    ("gen_head.reverse_qformer.encoder.", "Reverse_Qformer.bert.encoder."),
    ("gen_head.reverse_queries", "reverse_tokens"),
    ("gen_head.proj.", "distill_text_proj."),
]
_TO_LAVIS_INNER = [
    (".attention.attention.", ".attention.self."),
    (".crossattention.attention.", ".crossattention.self."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
    (".self_attn.qkv.", ".attn.qkv."),
    (".self_attn.projection.", ".attn.proj."),
]


def to_lavis(name: str) -> str:
    for ours, theirs in _TO_LAVIS:
        if name.startswith(ours):
            name = theirs + name.removeprefix(ours)
            break
    for ours, theirs in _TO_LAVIS_INNER:
        name = name.replace(ours, theirs)
    return name


def test_official_key_names_map_onto_the_module():
    assert seed_checkpoint_key("Qformer.bert.encoder.layer.0.crossattention.self.key.weight") == (
        "qformer.qformer.encoder.layer.0.crossattention.attention.key.weight"
    )
    assert seed_checkpoint_key("blocks_text.3.attn.proj.bias") == "gen_head.blocks.blocks.3.self_attn.projection.bias"
    assert seed_checkpoint_key("pos_embed") == "recon_head.pos_embed"
    for unused in ("visual_encoder.blocks.0.attn.qkv.weight", "temp", "itm_head.weight", "Qformer.bert.embeddings.position_ids"):
        assert seed_checkpoint_key(unused) is None


# Stage 1 of the official training saves the Causal Q-Former (+ ln_vision, text branch, ITC) as causal_qformer.pth;
# stage 2 freezes those, so seed_tokenizer.pth holds only the codebook, task layers and heads.
_STAGE1_PREFIXES = ("Qformer.", "query_tokens", "ln_vision.", "vision_proj.", "text_proj.", "temp", "itm_head.")


def official_v1_files(source: SeedTokenizer, directory) -> tuple[str, str]:
    """`source`'s weights as the two official SEED v1 files (LAVIS names, `{"model": state}`), without the ViT trunk."""
    lavis_state = {to_lavis(name): tensor for name, tensor in source.state_dict().items()}
    lavis_state.update({"temp": torch.tensor(0.07), "itm_head.weight": torch.zeros(2, 32)})
    stage1 = {name: t for name, t in lavis_state.items() if name.startswith(_STAGE1_PREFIXES)}
    stage2 = {name: t for name, t in lavis_state.items() if name not in stage1 and not name.startswith("visual_encoder.")}
    paths = (str(directory / "causal_qformer.pth"), str(directory / "seed_tokenizer.pth"))
    torch.save({"model": stage1}, paths[0])
    torch.save({"model": stage2}, paths[1])
    return paths


def test_from_seed_checkpoint_reproduces_the_saved_tokenizer(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    source = image_dependent_codes(SeedTokenizer(config)).eval()
    for ours in source.state_dict():
        theirs = to_lavis(ours)
        assert seed_checkpoint_key(theirs) == (None if theirs.startswith("visual_encoder.") else ours), theirs
    paths = official_v1_files(source, tmp_path)

    torch.manual_seed(1)
    loaded = SeedTokenizer.from_seed_checkpoint(list(paths), config)
    assert not any(module.training for module in loaded.modules()), "returned in eval mode"
    image_embeds = torch.randn(2, 17, 32)
    codes = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.qformer(image_embeds), source.qformer(image_embeds))
        torch.testing.assert_close(loaded.decode(codes), source.decode(codes))
        torch.testing.assert_close(loaded.recon_head(loaded.embed_codes(codes)), source.recon_head(source.embed_codes(codes)))
    torch.testing.assert_close(loaded.vision.ln_vision.weight, source.vision.ln_vision.weight)

    lavis_state = torch.load(paths[1])["model"]
    del lavis_state["quantize.embedding.weight"]
    torch.save(lavis_state, tmp_path / "incomplete.pth")
    with pytest.raises(ConfigError, match="lacks required tensors.*quantizer.embedding.weight"):
        SeedTokenizer.from_seed_checkpoint([paths[0], str(tmp_path / "incomplete.pth")], config)


def test_from_seed_checkpoint_asks_for_both_official_files(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    paths = official_v1_files(SeedTokenizer(config), tmp_path)
    with pytest.raises(ConfigError, match=r"lacks required tensors \(.*qformer\.query_tokens.*causal_qformer.pth \(stage 1\) and "
                                          r"seed_tokenizer.pth \(stage 2\)") as error:
        SeedTokenizer.from_seed_checkpoint(paths[1], config)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"nope.pth does not exist; download both official v1 files .*"
                                          r"causal_qformer.pth \(stage 1\) and seed_tokenizer.pth \(stage 2\)"):
        SeedTokenizer.from_seed_checkpoint([str(tmp_path / "nope.pth"), paths[1]], config)


def test_from_seed_checkpoint_logs_the_vit_from_vision_pretrained_as_loaded(tmp_path, caplog):
    torch.manual_seed(0)
    Blip2ForImageTextRetrieval(tiny_blip2_config()).save_pretrained(tmp_path / "blip2")
    config = tiny_config(VisionEncoderConfig(pretrained=str(tmp_path / "blip2")))
    source = image_dependent_codes(SeedTokenizer.from_config(config)).eval()
    stage1, stage2 = official_v1_files(source, tmp_path)
    state = torch.load(stage1)
    del state["model"]["Qformer.bert.embeddings.word_embeddings.weight"]  # an optional tensor, truly left at its init
    torch.save(state, stage1)

    caplog.set_level(logging.INFO)
    loaded = SeedTokenizer.from_seed_checkpoint([stage1, stage2], config)
    num_vit = sum(name.startswith("vision.model.") and "post_layernorm" not in name for name in source.state_dict())
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"{num_vit} ViT tensors kept from vision.pretrained {tmp_path / 'blip2'}" in m for m in messages), messages
    left = [m for m in messages if "left at their init" in m]
    assert len(left) == 1 and left[0].endswith("1 tensors not in it, left at their init: qformer.embeddings.word_embeddings.weight")
    pixels = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded.encode(pixels), source.encode(pixels)), "the whole image -> codes path is the source's"


def test_bad_dims_are_config_errors():
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        VisionEncoderConfig(image_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        CausalQFormerConfig(hidden_size=32, num_heads=3)
    with pytest.raises(ConfigError, match="must divide the Q-Former width"):
        SeedTokenizer(dataclasses.replace(tiny_config(), recon_head=ReconstructionHeadConfig(depth=1, num_heads=5)))
