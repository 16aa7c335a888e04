"""The `seed-lightning` command: checkpoint paths and a quiet stderr."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess:
    """`python -m ...` from the repository root, as a user runs it (PYTHONPATH is inherited)."""
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=300)


def truncated_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(1000)}, "optimizer_states": [{}], "global_step": 1}, path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


@pytest.mark.slow
def test_truncated_checkpoint_is_one_line_for_fit_validate_and_evaluate(tmp_path):
    checkpoint = truncated_checkpoint(tmp_path / "epoch=3.ckpt")
    config = ["-c", "conf/tokenizer/tiny.yaml", "--trainer.default_root_dir", str(tmp_path)]
    for subcommand in ("fit", "validate"):
        result = run("seed_lightning.cli", "tokenizer", subcommand, *config, "--ckpt_path", str(checkpoint))
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert f"{checkpoint}: it is truncated or corrupt" in result.stderr and "--ckpt_path" in result.stderr

    result = run("seed_lightning.evaluate", "tokenizer", "--ckpt", str(checkpoint), "--config", config[1])
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert f"{checkpoint}: it is truncated or corrupt" in result.stderr and "--ckpt" in result.stderr


@pytest.mark.slow
def test_cli_call_does_not_print_lightnings_args_warning():
    result = run("seed_lightning.cli", "tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "trainer:" in result.stdout
    assert "args parameter" not in result.stderr
