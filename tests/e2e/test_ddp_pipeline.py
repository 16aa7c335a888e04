"""The tiny pipeline under DDP on 2 CPU processes (gloo), through the real commands, as a user runs it: stage 1,
stage 2 (generation loss, reconstruction CLIP + grid), extract-tokens under torchrun, MLLM fit with its validation
callbacks, then `evaluate` on 2 processes, which must print the CIDEr and VQA accuracy of 1 process. Few steps, a
32-image val set."""

import json
import sys

import pytest

from tests.cli_runs import CLI, CLIP_SCORE_CALLBACK, evaluate, mllm_overlay, run_ok, val_images
from tests.e2e.test_train_mllm import scalars
from tests.e2e.test_train_tokenizer import fit

TRAIN_IMAGES = "data/synthetic/shards/train-{000000..000001}.tar"  # two shards: one per extracting rank
NUM_CODES = 1024  # conf/tokenizer/tiny.yaml's codebook
LM_METRICS = ("val/CIDEr", "val/BLEU_1", "val/BLEU_4", "val/ROUGE_L", "val/vqa_acc", "val/vqa_acc_yes_no",
              "val/vqa_acc_number", "val/vqa_acc_other", "val/vqa_questions", "val/vqa_acc_majority_baseline")
"""What `evaluate` prints from the LM's generations (the issue's must-show: CIDEr and VQA accuracy)."""


def extract_tokens(tokenizer, shards: str, out, prefix: str, log) -> None:
    """`seed-lightning extract-tokens` on 2 processes started by torchrun (each takes every other shard)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_ok([*torchrun, *CLI[1:], "extract-tokens", "--tokenizer", str(tokenizer), "--shards", shards,
            "--out", str(out), "--prefix", prefix, "--no-progress"], log)


@pytest.mark.slow
def test_tiny_pipeline_on_two_cpu_processes(default_world, tmp_path):
    val = f"{tmp_path}/val-{{0..1}}.tar"
    for shard in range(2):
        val_images(tmp_path / f"val-{shard}.tar", start=16 * shard, count=16)
    data = f"""\
  train: [{{urls: "{TRAIN_IMAGES}"}}]
  val: "{val}"
  batch_size: 32
  val_batch_size: 8
  samples_per_epoch: 192
  num_workers: 0
"""
    no_sanity_check = ("--trainer.num_sanity_val_steps", "0")
    fit(tmp_path, "contrastive", data=data, overrides=("--trainer.max_epochs", "1", *no_sanity_check), devices=2)
    assert scalars(tmp_path / "contrastive", "val/i2t_R@1")
    fit(tmp_path, "codebook", callbacks=CLIP_SCORE_CALLBACK, data=data, overrides=no_sanity_check, devices=2)
    assert scalars(tmp_path / "codebook", "val/recon_clip_similarity") and scalars(tmp_path / "codebook", "val/gen")
    assert (tmp_path / "codebook" / "clip_grid_epoch0.png").is_file()

    tokens, tokenizer = tmp_path / "tokens", tmp_path / "seed_tokenizer"
    extract_tokens(tokenizer, TRAIN_IMAGES, tokens, "train", tmp_path / "extract-train.log")
    extract_tokens(tokenizer, val, tokens, "val", tmp_path / "extract-val.log")
    assert sorted(path.name for path in tokens.glob("val-*.tar")) == ["val-rank0-000000.tar", "val-rank1-000000.tar"]

    mllm = tmp_path / "mllm"
    (tmp_path / "mllm.yaml").write_text(mllm_overlay(str(tokenizer), tokens, NUM_CODES, val_batch_size=8))
    configs = ["conf/mllm/tiny.yaml", tmp_path / "mllm.yaml"]
    run_ok([*CLI, "mllm", "fit", *(f"--config={config}" for config in configs), "--trainer.max_epochs", "1",
            *no_sanity_check, "--trainer.default_root_dir", str(mllm), "--data.batch_size", "32",
            "--data.samples_per_epoch", "6144"], tmp_path / "mllm.log", devices=2)  # 96 steps
    for tag in ("val/caption_loss", "val/CIDEr", "val/vqa_acc", "val/clip_score"):
        assert scalars(mllm, tag), tag

    # As users run it (Lightning shares the cores out among the processes): the LM's numbers do not depend on that.
    two = evaluate("mllm", mllm / "checkpoints" / "last.ckpt", configs, tmp_path / "eval-2", devices=2)
    assert "sync_dist" not in (tmp_path / "eval-2" / "log.txt").read_text(), "no advice to sync identical metrics"
    one = evaluate("mllm", mllm / "checkpoints" / "last.ckpt", configs, tmp_path / "eval-1", devices=1)
    print("\n" + "\n".join(f"{name:<32}{one[name]:>12.6f}{two[name]:>12.6f}" for name in LM_METRICS))
    assert {name: two[name] for name in LM_METRICS} == {name: one[name] for name in LM_METRICS}
    assert one["val/CIDEr"] > 0 and one["val/vqa_acc"] > 0, "96 steps teach the LM enough to compare more than zeros"
    for name in ("val/loss", "val/caption_loss", "val/image_loss"):
        assert two[name] == pytest.approx(one[name], rel=1e-6), name
    for results in ("captions_epoch0.json", "vqa_results_epoch0.json"):
        written = [(tmp_path / f"eval-{devices}" / results).read_bytes() for devices in (1, 2)]
        assert written[0] == written[1], results
    assert json.loads((tmp_path / "eval-1" / "captions_epoch0.json").read_text())  # 32 captions
