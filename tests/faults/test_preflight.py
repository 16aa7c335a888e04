import shutil
import tempfile
from argparse import ArgumentError
from dataclasses import dataclass

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from seed_lightning import preflight
from seed_lightning.errors import ConfigError
from seed_lightning.preflight import (
    check_accelerator,
    check_free_disk,
    check_output_dir,
    check_precision,
    format_cli_error,
    run_preflight,
)

GIB = 1024**3


def one_line_error(match, check, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as error:
        check(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_output_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    message = one_line_error("cannot create output directory", check_output_dir, blocker / "run")
    assert str(blocker / "run") in message and "default_root_dir" in message


def test_output_dir_that_is_not_writable(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)  # root ignores chmod
    one_line_error("is not writable", check_output_dir, tmp_path)
    monkeypatch.undo()

    def read_only_filesystem(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_filesystem)
    one_line_error("cannot write in output directory .*Read-only", check_output_dir, tmp_path)


def test_nearly_full_disk(tmp_path, monkeypatch):
    asked = []

    def usage(path):
        asked.append(path)
        return shutil._ntuple_diskusage(100 * GIB, 99.5 * GIB, GIB // 2)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    message = one_line_error("only 0.50 GiB free", check_free_disk, tmp_path / "not" / "yet", min_free_gib=1)
    assert "1 GiB minimum" in message
    assert asked[-1] == tmp_path  # the nearest existing parent
    check_free_disk(tmp_path, min_free_gib=0.25)


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("gpu", "cuda"):
        one_line_error("needs CUDA.*accelerator cpu", check_accelerator, accelerator, devices=1)
    check_accelerator("cpu", devices=2)
    check_accelerator("auto")


def test_more_gpus_requested_than_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for devices in (4, "3", [0, 2], "0,2"):
        one_line_error("only 2 visible", check_accelerator, "gpu", devices)
    for devices in (2, "auto", -1, [1], "0,1"):
        check_accelerator("gpu", devices)


def test_precision_that_does_not_fit_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error("16-mixed .*does not work on CPU.*bf16-mixed", check_precision, "16-mixed", "cpu")
    one_line_error("does not work on CPU", check_precision, 16, "auto")  # auto resolves to CPU here
    check_precision("bf16-mixed", "cpu")
    check_precision("32-true", "auto")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    one_line_error("needs bfloat16, which Tesla V100 lacks", check_precision, "bf16-mixed", "gpu")
    check_precision("16-mixed", "gpu")


def test_run_preflight_passes_on_a_sane_setup_and_creates_the_directory(tmp_path):
    run_preflight(tmp_path / "run", accelerator="cpu", devices=1, precision="bf16-mixed", min_free_gib=0)
    assert (tmp_path / "run").is_dir()


@dataclass
class OptimSettings:
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 10
    """Linear warm-up length."""


class TinyModule(LightningModule):
    def __init__(self, hidden_size: int = 4, optim: OptimSettings = OptimSettings()):  # noqa: B008
        super().__init__()


class OneLineErrorsCLI(LightningCLI):
    """How an entry point uses format_cli_error: it needs the parser for the list of valid keys."""

    def parse_arguments(self, parser, args):
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            raise ConfigError(format_cli_error(exc, parser)) from None


def cli_error(args) -> str:
    with pytest.raises(ConfigError) as error:
        OneLineErrorsCLI(TinyModule, args=args, parser_kwargs={"exit_on_error": False}, save_config_callback=None)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.filterwarnings("ignore:.*args parameter")
def test_misspelt_cli_keys_get_the_closest_valid_key(tmp_path):
    assert cli_error(["fit", "--trainer.max_stepz", "5"]) == (
        "unknown option 'trainer.max_stepz'; did you mean 'trainer.max_steps'?"
    )
    assert "did you mean 'model.hidden_size'?" in cli_error(["fit", "--model.hiden_size=5"])
    assert cli_error(["fitt"]) == "unknown subcommand 'fitt'; did you mean 'fit'?"

    config = tmp_path / "config.yaml"
    config.write_text("model:\n  optim:\n    warmup_step: 3\n")
    assert "did you mean 'model.optim.warmup_steps'?" in cli_error(["fit", "--config", str(config)])
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args:\n        save_lst: true\n"
    )
    assert cli_error(["fit", "--config", str(config)]) == (
        "unknown option 'save_lst' for ModelCheckpoint; did you mean 'save_last'?"
    )
    assert "no_such_option" in cli_error(["fit", "--zzz.no_such_option", "1"])
    assert "Expected a <class 'int'>" in cli_error(["fit", "--model.hidden_size", "abc"])
