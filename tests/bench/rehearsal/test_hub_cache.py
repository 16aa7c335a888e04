"""The tiny hub cache: the hub layouts, and every hub id the paper configs name resolving offline through the
project's own loaders (core/pretrained.py, tokenizer/vision.py, causal_qformer.py, sd_text_encoder.py,
image_decoder.py, mllm/model.py, core/clip_score.py)."""

import json
import os
import subprocess
import sys

import pytest

from bench.rehearsal import hub_cache
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-cache")
    hub_cache.build_cache(cache, scale="tiny", device="cpu", log=lambda line: None)
    return cache


@pytest.mark.slow
def test_every_repo_has_the_hub_cache_layout(tiny_cache):
    for repo_id in hub_cache.HUB_IDS:
        folder = hub_cache.repo_folder(tiny_cache, repo_id)
        commit = (folder / "refs" / "main").read_text()
        assert len(commit) == 40 and (folder / "snapshots" / commit).is_dir()
    blip2 = hub_cache.snapshot(tiny_cache, hub_cache.BLIP2)
    index = json.loads((blip2 / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    config = json.loads((blip2 / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"] and config["num_query_tokens"] == 32
    assert {"vocab.json", "merges.txt", "tokenizer.json", "preprocessor_config.json",
            "processor_config.json"} <= {p.name for p in blip2.iterdir()}
    sd = hub_cache.snapshot(tiny_cache, hub_cache.SD)
    components = json.loads((sd / "model_index.json").read_text())
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor", "safety_checker"):
        assert components[name][0] is not None and (sd / name).is_dir()
    assert components["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert json.loads((sd / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    opt = json.loads((hub_cache.snapshot(tiny_cache, hub_cache.OPT) / "config.json").read_text())
    assert (opt["vocab_size"], opt["max_position_embeddings"], opt["dtype"]) == (50272, 2048, "float16")
    assert (hub_cache.snapshot(tiny_cache, hub_cache.BERT) / "vocab.txt").is_file()


@pytest.mark.slow
def test_every_hub_id_resolves_offline_through_the_project_loaders(tiny_cache):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for variable in ("HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        env.pop(variable, None)  # --check sets the cache and offline mode itself
    result = subprocess.run(
        [sys.executable, "-m", "bench.rehearsal.hub_cache", "--cache", str(tiny_cache), "--scale", "tiny", "--check",
         "--load-weights"], cwd=tiny_cache, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = [line for line in result.stdout.splitlines() if line.startswith("resolved ")]
    assert [line.split()[1].rstrip(":") for line in resolved] == list(hub_cache.HUB_IDS)
