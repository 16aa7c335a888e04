"""The tiny offline "pretrained" models: every folder loads with from_pretrained and runs."""

import json
from pathlib import Path

import pytest
import torch

from devkit import synthetic, tiny_models
from devkit.tiny_models import TINY
from seed_lightning.core.errors import ConfigError


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data") / "synthetic"
    synthetic.generate(data, num_train=40, num_val=8)
    return data / "corpus.txt"


@pytest.fixture(scope="module")
def models(corpus, tmp_path_factory) -> dict[str, Path]:
    return tiny_models.build_all(corpus, tmp_path_factory.mktemp("models"))


def test_bert_tokenizer_is_a_lowercase_wordpiece_with_bert_specials(models, corpus):
    from transformers import AutoTokenizer, BertTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models[tiny_models.BERT_TOKENIZER])
    assert isinstance(tokenizer, BertTokenizer)
    assert tokenizer.convert_ids_to_tokens(range(5)) == list(tiny_models.BERT_SPECIAL_TOKENS)
    encoded = tokenizer("Two small RED circles, at the top!", padding="max_length", max_length=16)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[:10] == ["[CLS]", "two", "small", "red", "circles", ",", "at", "the", "top", "!"]
    assert tokens[10] == "[SEP]" and set(tokens[11:]) == {"[PAD]"}
    # Corpus text never hits [UNK], nor does other ASCII text (the alphabet covers printable ASCII).
    lines = corpus.read_text().splitlines()[:200] + ["Xylophone #42 & {zebra}?"]
    assert all(tokenizer.unk_token_id not in ids for ids in tokenizer(lines)["input_ids"])
    # The BLIP-2 folder carries the same tokenizer.
    blip2_files = file_bytes(models[tiny_models.TINY_BLIP2])
    assert all(blip2_files[name] == data for name, data in file_bytes(models[tiny_models.BERT_TOKENIZER]).items())


def test_tiny_blip2_loads_completely_and_scores_image_text_pairs(models):
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    folder = models[tiny_models.TINY_BLIP2]
    model, info = Blip2ForImageTextRetrieval.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    assert (config.vision_config.image_size, config.vision_config.hidden_size) == (TINY.image_size, TINY.vision_hidden_size)
    assert config.qformer_config.encoder_hidden_size == TINY.vision_hidden_size
    assert config.qformer_config.vocab_size == len(tokenizer) and config.qformer_config.use_qformer_text_input
    assert config.num_query_tokens == TINY.num_query_tokens and config.image_text_hidden_size == TINY.itc_dim
    assert 0.015 < model.query_tokens.std().item() < 0.025  # BLIP-2's N(0, 0.02), not transformers' zeros

    torch.manual_seed(0)
    pixels = torch.randn(2, 3, TINY.image_size, TINY.image_size)
    text = tokenizer(["a small red circle", "two large blue stars"], padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask)
        image_tokens = model.vision_model(pixel_values=pixels).last_hidden_state
    assert out.logits_per_image.shape == (2, 2) and torch.isfinite(out.logits_per_image).all()
    assert image_tokens.shape == (2, (TINY.image_size // TINY.patch_size) ** 2 + 1, TINY.vision_hidden_size)
    # The frozen random ViT must see its input: different images give clearly different features.
    assert (image_tokens[0] - image_tokens[1]).abs().mean() > 0.1


def test_tiny_sd_tokenizer_and_text_encoder_agree(models):
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = models[tiny_models.TINY_SD]
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert tokenizer.eos_token_id == len(tokenizer) - 1 == text_encoder.config.eos_token_id

    batch = tokenizer(["Two small red circles", "Zebra?!"], padding="max_length", max_length=TINY.sd_max_length,
                      truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, TINY.sd_max_length)
    tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[0])
    assert tokens[:6] == ["<|startoftext|>", "two</w>", "small</w>", "red</w>", "circles</w>", "<|endoftext|>"]
    assert set(tokens[6:]) == {"<|endoftext|>"}
    unseen = batch.input_ids[1][batch.attention_mask[1].bool()]
    assert tokenizer.eos_token_id not in unseen[:-1].tolist()  # unseen words fall back to byte symbols, not <unk>
    assert tokenizer.decode(batch.input_ids[1], skip_special_tokens=True) == "zebra ?!"  # CLIP splits punctuation off
    with torch.no_grad():
        hidden = text_encoder(batch.input_ids).last_hidden_state
    assert hidden.shape == (2, TINY.sd_max_length, TINY.sd_text_hidden_size)


def test_tiny_sd_pipeline_renders_32px_images(models):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipeline = StableDiffusionPipeline.from_pretrained(models[tiny_models.TINY_SD])
    pipeline.set_progress_bar_config(disable=True)
    assert isinstance(pipeline.tokenizer, CLIPTokenizer) and pipeline.safety_checker is None
    tokens = pipeline.tokenizer(["a red circle", ""], padding="max_length", max_length=TINY.sd_max_length, return_tensors="pt")
    with torch.no_grad():
        prompt_embeds, negative_embeds = pipeline.text_encoder(tokens.input_ids).last_hidden_state.chunk(2)
    images = pipeline(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, guidance_scale=7.5,
        num_inference_steps=3, generator=torch.Generator().manual_seed(42), output_type="np",
    ).images
    assert images.shape == (1, TINY.sd_image_size, TINY.sd_image_size, 3)
    assert ((images >= 0) & (images <= 1)).all() and images.std() > 0
    image = pipeline("a red circle", num_inference_steps=2).images[0]  # default size, through the tokenizer
    assert image.size == (TINY.sd_image_size, TINY.sd_image_size)


def test_tiny_opt_follows_the_opt_conventions(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer, OPTForCausalLM

    folder = models[tiny_models.TINY_OPT]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, OPTForCausalLM)
    assert tokenizer.convert_ids_to_tokens(range(4)) == list(tiny_models.OPT_SPECIAL_TOKENS)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "</s>", "<pad>")
    config = model.config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, 2, 1)
    assert (config.hidden_size, config.num_hidden_layers, config.ffn_dim) == (TINY.opt_hidden_size, TINY.opt_layers, TINY.opt_ffn_dim)
    assert config.vocab_size == len(tokenizer)

    text = "two small red circles. Question: how many stars are there? Answer: 2"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.unk_token_id not in ids  # byte-level: any text is representable
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer("a small red circle").input_ids) <= 5  # corpus words are single tokens

    batch = tokenizer(["a red circle", text], padding=True, return_tensors="pt")
    assert batch.input_ids[0, -1] == tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(batch.input_ids[1:], max_new_tokens=3, do_sample=False)
    assert logits.shape == (*batch.input_ids.shape, len(tokenizer)) and torch.isfinite(logits).all()
    assert generated.shape == (1, batch.input_ids.shape[1] + 3)


def test_build_all_skips_existing_parts_and_is_deterministic(models, corpus, tmp_path):
    before = {name: {p: p.stat().st_mtime_ns for p in folder.rglob("*")} for name, folder in models.items()}
    again = tiny_models.build_all(corpus, next(iter(models.values())).parent)
    assert again == models
    assert before == {name: {p: p.stat().st_mtime_ns for p in folder.rglob("*")} for name, folder in models.items()}

    rebuilt = tiny_models.build_all(corpus, tmp_path / "rebuilt")
    for name, folder in models.items():
        assert file_bytes(rebuilt[name]) == file_bytes(folder), name
    assert not [p for p in (tmp_path / "rebuilt").iterdir() if p.name.startswith(".")]  # no staging leftovers

    index = json.loads((models[tiny_models.TINY_SD] / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["scheduler"] == ["diffusers", "PNDMScheduler"]


def test_missing_corpus_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="devkit.synthetic"):
        tiny_models.build_all(tmp_path / "nowhere.txt", tmp_path / "models")
    with pytest.raises(SystemExit) as exit_info:
        tiny_models.main(["--corpus", str(tmp_path / "nowhere.txt"), "--out", str(tmp_path / "models")])
    assert exit_info.value.code == 2
