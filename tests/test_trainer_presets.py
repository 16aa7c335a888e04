"""conf/trainer presets parse with the Trainer's own signature, compose with --config, and build their
strategies on CPU (nothing is launched)."""

from pathlib import Path

import pytest
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.opt.modeling_opt import OPTDecoderLayer

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "trainer"


def parse(*configs: Path, overrides: tuple[str, ...] = ()) -> dict:
    """Trainer init args as LightningCLI would give them (subclass specs instantiated, Trainer not)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(Trainer, "trainer", instantiate=False)
    args = [a for config in configs for a in ("--config", str(config))] + list(overrides)
    return dict(parser.instantiate_classes(parser.parse_args(args)).trainer)


def test_cpu_preset_builds_a_trainer(tmp_path):
    trainer = Trainer(**{**parse(PRESETS / "cpu.yaml"), "default_root_dir": tmp_path, "logger": False})
    assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert trainer.precision == "32-true"
    assert trainer.num_devices == 1


def test_ddp_preset_builds_a_two_process_trainer_on_cpu(tmp_path):
    args = parse(PRESETS / "ddp.yaml", overrides=("--trainer.accelerator", "cpu", "--trainer.devices", "2",
                                                    "--trainer.precision", "32-true"))
    strategy = args["strategy"]
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is False
    assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True
    trainer = Trainer(**{**args, "default_root_dir": tmp_path, "logger": False})
    assert trainer.strategy is strategy
    assert trainer.num_devices == 2 and trainer.world_size == 2  # world size known, no process launched
    assert not torch.distributed.is_initialized()


def test_ddp_preset_gpu_settings():
    args = parse(PRESETS / "ddp.yaml")
    assert (args["accelerator"], args["devices"], args["precision"]) == ("gpu", -1, "bf16-mixed")


def test_fsdp_preset_wraps_opt_layers_keeps_original_params_and_mixes_bf16():
    args = parse(PRESETS / "fsdp.yaml")
    strategy = args["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == {OPTDecoderLayer}
    # LoRA under FSDP: frozen and trainable parameters share flat parameters only with use_orig_params.
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    # The mixed-precision config FSDP gets from the preset's precision: bf16 gathers, compute and reduction.
    mixed = FSDPPrecision(args["precision"]).mixed_precision_config
    assert args["precision"] == "bf16-mixed"
    assert mixed.param_dtype == mixed.reduce_dtype == torch.bfloat16
    assert FSDPPrecision(args["precision"]).forward_context().fast_dtype == torch.bfloat16


def test_fsdp_preset_refuses_cpu_with_lightnings_message():
    args = parse(PRESETS / "fsdp.yaml", overrides=("--trainer.accelerator", "cpu", "--trainer.devices", "2"))
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        Trainer(**{**args, "logger": False})


def test_presets_compose_after_a_model_config(tmp_path):
    model_config = tmp_path / "run.yaml"
    model_config.write_text("trainer:\n  max_steps: 7\n  precision: 16-mixed\n  accelerator: gpu\n")
    args = parse(model_config, PRESETS / "cpu.yaml")
    assert args["max_steps"] == 7  # kept from the earlier file
    assert (args["accelerator"], args["precision"]) == ("cpu", "32-true")  # the preset wins where it speaks
