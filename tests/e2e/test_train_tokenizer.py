"""End to end: the tiny default tokenizer config, both stages through the CLI (as `make train-tokenizer`
runs them, outputs redirected to a temporary folder, fewer epochs), then retrieval computed here from the
exported tokenizer: learning must have happened."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seed_lightning.core.data.datamodule import ShardDataModule
from seed_lightning.lightning_cli import RUN_DEFAULTS
from seed_lightning.tokenizer.model import SeedTokenizer
from seed_lightning.tokenizer.retrieval import retrieval_recall
from tests.cli_runs import CLI, assert_dashboard, run_ok


RUN_CALLBACKS = "\n".join(f"    - {json.dumps(callback)}" for callback in RUN_DEFAULTS["trainer.callbacks"])
"""The callbacks every run has (learning-rate monitor, NaN guard, pre-emption) as YAML list items."""


def overlay(run: Path, stage: str, callbacks: str = "", data: str = "") -> str:
    """The stage's outputs under `run`; `callbacks` (YAML list items) are the trainer's callbacks besides the
    checkpoint callback and those every run has (the stage configs' own, such as stage 2's CLIP score, are
    replaced), `data` (indented YAML lines) overrides data keys."""
    stage_dir = run / stage
    extra = ""
    if stage == "codebook":
        extra = f"""
model:
  init_from: {run}/contrastive/checkpoints/last.ckpt
  export_dir: {run}/seed_tokenizer
  cache_dir: {run}/cache
"""
    return f"""
trainer:
  {"max_epochs: 1" if stage == "codebook" else ""}
  default_root_dir: {stage_dir}
  enable_progress_bar: false
  callbacks:
{callbacks}
{RUN_CALLBACKS}
{"data:" if data else ""}
{data}""" + extra


def fit(run: Path, stage: str, callbacks: str = "", data: str = "", overrides: tuple[str, ...] = (),
        devices: int = 1) -> str:
    """`seed-lightning tokenizer fit` of the tiny config's `stage`, outputs under `run` (see `overlay`); returns its
    log."""
    run.mkdir(parents=True, exist_ok=True)
    (run / f"{stage}.yaml").write_text(overlay(run, stage, callbacks, data))
    configs = ["-c", "conf/tokenizer/tiny.yaml"]
    if stage == "codebook":
        configs += ["-c", "conf/tokenizer/tiny-codebook.yaml"]
    command = [*CLI, "tokenizer", "fit", *configs, "-c", str(run / f"{stage}.yaml"), *overrides]
    return run_ok(command, run / f"{stage}.log", timeout=900, devices=devices)


@torch.no_grad()
def val_retrieval(tokenizer: SeedTokenizer, world) -> dict[str, float]:
    from transformers import AutoTokenizer

    text_tokenizer = AutoTokenizer.from_pretrained(world.models / "bert-tokenizer")
    data = ShardDataModule(val=str(world.shards / "val-000000.tar"), image_size=tokenizer.image_size,
                           val_batch_size=64, num_workers=0)
    data.setup("validate")
    images, texts, owners = [], [], []
    for batch in data.val_dataloader():
        for offset, meta in enumerate(batch["meta"]):
            image_index = sum(len(i) for i in images) + offset
            texts += meta["captions"]
            owners += [image_index] * len(meta["captions"])
        images.append(tokenizer.qformer.image_features(tokenizer.causal_embeddings(batch["pixel_values"])))
    encoded = text_tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    text_features = tokenizer.qformer.text_features(tokenizer.qformer.encode_text(encoded["input_ids"], encoded["attention_mask"]))
    return retrieval_recall(torch.cat(images) @ text_features.t(), torch.tensor(owners))


@pytest.mark.slow
def test_tiny_default_tokenizer_learns(default_world, tmp_path):
    fit(tmp_path, "contrastive", overrides=("--trainer.max_epochs", "2"))  # half the config's: minutes of the suite
    fit(tmp_path, "codebook")
    for stage in ("contrastive", "codebook"):  # the speed meter every run has: images/s and measured FLOP/s
        events = EventAccumulator(str(tmp_path / stage))
        events.Reload()
        assert {"throughput/samples_per_sec", "throughput/flops_per_sec"} <= set(events.Tags()["scalars"]), stage
    assert_dashboard(tmp_path / "contrastive", hyperparameter=("model.optim.lr", 5e-4), metric="val/t2i_R@1")
    assert_dashboard(tmp_path / "codebook", hyperparameter=("model.optim.lr", 1e-3), metric="val/loss")
    tokenizer = SeedTokenizer.load(tmp_path / "seed_tokenizer").eval()
    recall = val_retrieval(tokenizer, default_world)
    chance = {k: 100 * k / 256 for k in (1, 5, 10)}  # percent: the right image among the 256 val images in the top k
    print("\nval " + ", ".join(f"R@{k} i2t {recall[f'i2t_R@{k}']:.1f}% t2i {recall[f't2i_R@{k}']:.1f}% "
                                f"(chance {chance[k]:.1f}%)" for k in chance))
    assert recall["mean_R"] >= 3 * sum(chance.values()) / len(chance), recall  # mean_R averages the six R@k
    assert min(recall["i2t_R@10"], recall["t2i_R@10"]) >= 2 * chance[10], recall

    codes = tokenizer.encode(tokenizer.preprocess([Image.new("RGB", (80, 60), "red")]))
    assert codes.shape == (1, 32) and 0 <= int(codes.min()) and int(codes.max()) < tokenizer.config.num_codes
