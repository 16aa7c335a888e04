import json
import os

import pytest
import torch
from torch import nn
from transformers import BertConfig, Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.pretrained import (
    WEIGHTS_INDEX_FILE,
    load_hf_config,
    load_into,
    load_state_dict,
    resolve_file,
    sub_state_dict,
)


def tiny_blip2_config(text_branch: bool = True) -> Blip2Config:
    return Blip2Config(
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            initializer_range=0.02,  # BLIP-2's 1e-10 would make every tiny-tower output alike
        ),
        qformer_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=32,
            use_qformer_text_input=text_branch,
        ),
        text_config=dict(
            model_type="opt", hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            max_position_embeddings=64, word_embed_proj_dim=16,
        ),
        num_query_tokens=8,
        image_text_hidden_size=16,
    )


@pytest.fixture
def retrieval_dir(tmp_path):
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(tiny_blip2_config())
    model.save_pretrained(tmp_path / "itr")
    return tmp_path / "itr", model


@pytest.fixture
def sharded_generation_dir(tmp_path):
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(tiny_blip2_config(text_branch=False))
    model.save_pretrained(tmp_path / "gen", max_shard_size="20KB")
    return tmp_path / "gen", model


def test_single_file_prefix_selection_matches_the_model(retrieval_dir):
    path, model = retrieval_dir
    state = load_state_dict(path, "vision_model.")
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("vision_model.")}
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_several_prefixes_and_stripping(retrieval_dir):
    path, model = retrieval_dir
    state = load_state_dict(str(path), ("query_tokens", "text_projection."))
    assert set(state) == {"query_tokens", "text_projection.weight", "text_projection.bias"}
    stripped = sub_state_dict(state, "text_projection.")
    assert set(stripped) == {"weight", "bias"}
    assert torch.equal(stripped["weight"], model.text_projection.weight)


def test_sharded_checkpoint_reads_only_the_shards_it_needs(sharded_generation_dir):
    path, model = sharded_generation_dir
    weight_map = json.loads((path / WEIGHTS_INDEX_FILE).read_text())["weight_map"]
    vision_shards = {shard for name, shard in weight_map.items() if name.startswith("vision_model.")}
    other_shards = set(weight_map.values()) - vision_shards
    assert len(vision_shards) > 1 and other_shards  # the test needs a real split
    for shard in other_shards:  # a reader that opened these would now fail
        os.remove(path / shard)
    state = sub_state_dict(load_state_dict(path, "vision_model."), "vision_model.")
    assert state.keys() == model.vision_model.state_dict().keys()
    assert torch.equal(state["post_layernorm.weight"], model.vision_model.post_layernorm.weight)


def test_user_errors_are_config_errors(tmp_path, retrieval_dir):
    path, _ = retrieval_dir
    with pytest.raises(ConfigError, match="neither an existing folder"):
        load_state_dict(tmp_path / "does" / "not" / "exist", "vision_model.")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_state_dict(tmp_path / "empty", "vision_model.")
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf_config(tmp_path / "empty")
    with pytest.raises(ConfigError, match="holds no weights named language_model"):
        load_state_dict(path, "language_model.")
    assert resolve_file(path, "missing.json") is None
    assert resolve_file(path, "config.json") == os.path.join(path, "config.json")


def test_missing_shard_is_reported(sharded_generation_dir):
    path, _ = sharded_generation_dir
    weight_map = json.loads((path / WEIGHTS_INDEX_FILE).read_text())["weight_map"]
    os.remove(path / weight_map["query_tokens"])
    with pytest.raises(ConfigError, match="shard .* is missing"):
        load_state_dict(path, "query_tokens")


def test_load_hf_config_reads_the_blip2_config(retrieval_dir, tmp_path):
    path, model = retrieval_dir
    config = load_hf_config(path)
    assert isinstance(config, Blip2Config)
    assert config.vision_config.hidden_size == model.config.vision_config.hidden_size
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(tmp_path / "bert")
    assert isinstance(load_hf_config(tmp_path / "bert"), BertConfig)


def test_load_into_reports_missing_and_rejects_mismatches():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    source = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    partial = {k: v for k, v in source.state_dict().items() if k.startswith("0.")}

    left = load_into(module, partial, "ckpt", may_be_missing=lambda name: name.startswith("1."))
    assert sorted(left) == ["1.bias", "1.weight"]
    assert torch.equal(module[0].weight, source[0].weight)

    with pytest.raises(ConfigError, match="lacks required tensors"):
        load_into(module, partial, "ckpt")
    with pytest.raises(ConfigError, match="tensors the model lacks"):
        load_into(module, {**source.state_dict(), "2.weight": torch.zeros(1)}, "ckpt")
    with pytest.raises(ConfigError, match="size mismatch"):
        load_into(module, {**source.state_dict(), "0.weight": torch.zeros(5, 4)}, "ckpt")
