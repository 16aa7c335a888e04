"""The `seed-lightning` command: checkpoint paths, the run's config.yaml, and a quiet stderr."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer

from seed_lightning import cli
from tests.faults.regression import Regression

REPO = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess:
    """`python -m ...` from the repository root, as a user runs it (PYTHONPATH is inherited)."""
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=300)


def truncated_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(1000)}, "optimizer_states": [{}], "global_step": 1}, path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


def test_generate_names_a_missing_sd_folder_before_loading_anything(tmp_path, capsys):
    """`--sd` is a hub id or a folder, told apart as preflight does (`is_hub_id`): `~/...` is a folder."""
    argv = ["generate", "a cat", "-o", str(tmp_path / "out.png"), "--mllm", str(tmp_path), "--sd", "~/no-such-sd"]
    assert cli.main(argv) == 2
    assert "--sd ~/no-such-sd does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_truncated_checkpoint_is_one_line_for_fit_validate_and_evaluate(tmp_path):
    checkpoint = truncated_checkpoint(tmp_path / "epoch=3.ckpt")
    config = ["-c", "conf/tokenizer/tiny.yaml", "--trainer.default_root_dir", str(tmp_path)]
    for subcommand in ("fit", "validate", "evaluate"):
        result = run("seed_lightning.cli", "tokenizer", subcommand, *config, "--ckpt_path", str(checkpoint))
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert f"{checkpoint}: it is truncated or corrupt" in result.stderr and "--ckpt_path" in result.stderr


@pytest.mark.slow
def test_cli_call_does_not_print_lightnings_args_warning():
    result = run("seed_lightning.cli", "tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "trainer:" in result.stdout
    assert "args parameter" not in result.stderr


class CrashOnce(Callback):
    """Raises at the start of step 2 (after step 1's checkpoint) the first time, as a crash would."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1 and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError("simulated crash")


def overlay(run_dir: Path, max_steps: int) -> Path:
    """The tiny tokenizer config, shortened, writing into `run_dir` (checkpoints in run_dir/checkpoints)."""
    path = run_dir / f"steps{max_steps}.yaml"
    path.write_text(f"""
trainer:
  max_steps: {max_steps}
  max_epochs: -1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  default_root_dir: {run_dir}
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
    - class_path: tests.test_cli.CrashOnce
      init_args: {{marker: {run_dir}/crashed}}
checkpoint: {{monitor: null, every_n_train_steps: 1}}
data:
  batch_size: 4
  samples_per_epoch: 16
  num_workers: 0
""")
    return path


def fit(*args: str) -> int:
    return cli.main(["tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", *args])


@pytest.mark.slow
def test_config_beside_checkpoints_is_the_one_that_produced_them(default_world, tmp_path, monkeypatch):
    monkeypatch.chdir(default_world.repo)
    monkeypatch.setenv("SEED_LOG_LEVEL", "WARNING")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_dir / "config.yaml"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit("-c", str(overlay(run_dir, max_steps=2)))
    first = config.read_text()
    assert yaml.safe_load(first)["trainer"]["max_steps"] == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # Another run in the same folder, other settings, failing at start (its checkpoint holds another model).
    other_model = tmp_path / "other-model.ckpt"
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(Regression())
    trainer.save_checkpoint(other_model)
    with pytest.raises(RuntimeError, match="state_dict"):
        fit("-c", str(overlay(run_dir, max_steps=5)), "--model.optim.lr", "0.1", "--ckpt_path", str(other_model))
    assert config.read_text() == first

    # Resuming with the same config (the same command + --ckpt_path last): no prompt, the config stays.
    assert fit("-c", str(overlay(run_dir, max_steps=2)), "--ckpt_path", "last") == 0
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert config.read_text() == first
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == ["config.yaml"]

    # Resuming with other settings: the new config is written, the earlier one kept with its time.
    assert fit("-c", str(overlay(run_dir, max_steps=3)), "--ckpt_path", "last") == 0
    assert yaml.safe_load(config.read_text())["trainer"]["max_steps"] == 3
    kept = list(run_dir.glob("config.*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == first


STAGE_2 = ["-c", "conf/tokenizer/tiny.yaml", "-c", "conf/tokenizer/tiny-codebook.yaml"]


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_checkpoint_of_the_single_tokenizer_module_of_earlier_versions_is_one_line_naming_its_stage_class(
        tmp_path, monkeypatch, capsys, subcommand):
    monkeypatch.chdir(REPO)
    checkpoint = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"tokenizer.w": torch.ones(1)}, "optimizer_states": [{}], "global_step": 1,
                "hyper_parameters": {"stage": "codebook", "vq_weight": 5.0, "temperature": 0.07}}, checkpoint)
    code = cli.main(["tokenizer", subcommand, *STAGE_2, "--trainer.default_root_dir", str(tmp_path),
                     "--ckpt_path", str(checkpoint)])
    error = capsys.readouterr().err
    assert code == 2 and len(error.splitlines()) == 1, error
    assert "single TokenizerModule" in error
    assert "model.class_path seed_lightning.tokenizer.codebook.CodebookModule with model.init_from" in error


def test_a_tokenizer_config_that_picks_no_stage_class_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    config = yaml.safe_load((REPO / "conf/tokenizer/tiny.yaml").read_text())
    config["model"] = config["model"]["init_args"]  # no class_path: LightningCLI falls back to the base class
    (tmp_path / "flat.yaml").write_text(yaml.safe_dump(config))
    code = cli.main(["tokenizer", "fit", "-c", str(tmp_path / "flat.yaml"), "--trainer.default_root_dir", str(tmp_path)])
    error = capsys.readouterr().err.splitlines()
    assert code == 2 and error[-1].startswith("seed-lightning: error: model.class_path: choose a stage"), error
    assert "ContrastiveModule (stage 1)" in error[-1] and "Traceback" not in "\n".join(error)


@pytest.mark.slow
def test_validate_rebuilds_the_stage_module_of_an_explicit_checkpoint(default_world, tmp_path, monkeypatch):
    from tests.tokenizer.test_module import make_module, save_checkpoint

    monkeypatch.chdir(default_world.repo)
    monkeypatch.setenv("SEED_LOG_LEVEL", "WARNING")
    module = make_module(default_world, export_dir=str(tmp_path / "export"))
    checkpoint = save_checkpoint(module, tmp_path / "stage1.ckpt")
    overrides = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.limit_val_batches",
                 "1", "--trainer.enable_progress_bar", "false", "--data.val_batch_size", "8", "--data.num_workers", "0"]
    # Lightning rebuilds the module from the checkpoint's hyperparameters (its class path among them).
    assert cli.main(["tokenizer", "validate", "-c", "conf/tokenizer/tiny.yaml", *overrides,
                     "--ckpt_path", checkpoint]) == 0


def test_sigusr2_prints_the_stack_of_every_thread():
    # What the rehearsal sends a stage before killing it: the log then says where a run hung.
    code = ("import os, signal, time; from seed_lightning.cli import _dump_stacks_on_sigusr2; "
            "_dump_stacks_on_sigusr2(); os.kill(os.getpid(), signal.SIGUSR2); time.sleep(0.2); print('alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "alive"  # the dump does not stop the run
    assert "most recent call first" in done.stderr and "<string>" in done.stderr
