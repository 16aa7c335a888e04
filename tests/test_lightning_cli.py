"""SeedCLI: what every run shares is said once, and the run folder decides where a run writes."""

import lightning as L
import pytest

from seed_lightning.core.errors import ConfigError
from seed_lightning.lightning_cli import SeedCLI, effective_config


class Module(L.LightningModule):
    def __init__(self, width: int = 4):
        super().__init__()


def test_the_run_folder_decides_where_logs_and_checkpoints_go():
    config = effective_config(Module, ["fit", "--trainer.default_root_dir", "runs/tiny/stage"])
    assert config["checkpoint"]["dirpath"] == "runs/tiny/stage/checkpoints"
    logger = config["trainer"]["logger"]
    assert logger["class_path"] == "seed_lightning.core.tensorboard.TensorBoardLogger"
    assert (logger["init_args"]["save_dir"], logger["init_args"]["name"], logger["init_args"]["version"]) == (
        "runs/tiny", "stage", "")  # TensorBoard writes into runs/tiny/stage itself
    # Another logger follows the run folder too.
    config = effective_config(Module, ["fit", "--trainer.default_root_dir", "elsewhere", "--trainer.logger",
                                       "CSVLogger"])
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "."
    assert config["trainer"]["logger"]["init_args"]["name"] == "elsewhere"
    assert config["checkpoint"]["dirpath"] == "elsewhere/checkpoints"


def test_every_run_starts_from_the_shared_defaults_and_a_config_adds_callbacks(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  callbacks+:\n    - class_path: lightning.pytorch.callbacks.ModelSummary\n"
                      "checkpoint:\n  monitor: val/loss\n")
    parsed = effective_config(Module, ["fit", "-c", str(config)])
    assert [c["class_path"].rpartition(".")[2] for c in parsed["trainer"]["callbacks"]] == [
        "LearningRateMonitor", "NonFiniteGuard", "PreemptionCheckpoint", "ModelSummary"]
    assert [p["class_path"] for p in parsed["trainer"]["plugins"]] == [
        "seed_lightning.core.checkpointing.AtomicCheckpointIO"]
    checkpoint = parsed["checkpoint"]
    assert (checkpoint["monitor"], checkpoint["filename"], checkpoint["save_top_k"], checkpoint["save_last"]) == (
        "val/loss", "best-{epoch}-{step}", 1, True)
    assert parsed["seed_everything"] == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--checkpoint.dirpath", "x"],
     "checkpoint.dirpath follows trainer.default_root_dir and cannot be set; set trainer.default_root_dir instead"),
    (["--trainer.enable_checkpointing", "false"],
     "trainer.enable_checkpointing: every run has a checkpoint callback; to save no checkpoint, set "
     "checkpoint.save_top_k: 0 and checkpoint.save_last: false instead"),
])
def test_settings_the_run_decides_itself_are_one_line_errors(tmp_path, args, message):
    with pytest.raises(ConfigError) as error:
        SeedCLI(Module, args=["fit", "--trainer.default_root_dir", str(tmp_path), *args])
    assert str(error.value) == message


def test_a_stage_constructor_error_is_one_line(default_world, tmp_path, monkeypatch, capsys):
    # The tokenizer's stage classes are built by the parser (subclass mode), which would wrap a constructor's
    # ConfigError into a dump of the whole config.
    from seed_lightning.cli import main
    from seed_lightning.tokenizer.module import TokenizerModule

    def build(*args, **kwargs):
        raise ConfigError("model.init_from: this checkpoint holds no Q-Former; pass a stage-1 checkpoint")

    monkeypatch.setattr(TokenizerModule, "_build_tokenizer", build)
    monkeypatch.chdir(default_world.repo)
    code = main(["tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", "--trainer.default_root_dir", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert error.splitlines()[-1] == ("seed-lightning: error: model.init_from: this checkpoint holds no Q-Former; "
                                      "pass a stage-1 checkpoint")
    assert "Given value" not in error
