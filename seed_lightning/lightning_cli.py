"""`SeedCLI`: the one LightningCLI of `seed-lightning tokenizer ...` and `seed-lightning mllm ...`.

    seed-lightning {tokenizer,mllm} fit -c CONFIG.yaml [-c MORE.yaml] [--ckpt_path last] [--key value ...]
    seed-lightning {tokenizer,mllm} validate -c CONFIG.yaml --ckpt_path CKPT
    seed-lightning {tokenizer,mllm} evaluate -c CONFIG.yaml --ckpt_path CKPT [--out results.json]

Every YAML key is a typed argument of the LightningModule, ShardDataModule or Trainer (`--help` lists them with
their docstrings). Whatever the subcommand, the run is checked the same way before any class is built: the
arguments parse (a misspelt key gets the closest valid one), an explicit checkpoint file is readable, and
`core/preflight.py` finds everything the classes need; each failure is one ConfigError line.

What every run shares is said here once (`RUN_DEFAULTS`, `--print_config` shows it), so a conf/ file holds only
what differs:
- `trainer.default_root_dir` is THE run folder: the logger writes into it (its save_dir and name follow it) and
  `checkpoint.dirpath` is its `checkpoints/`;
- `checkpoint`: the ModelCheckpoint every run has (the best checkpoint by `checkpoint.monitor` as
  best-{epoch}-{step}.ckpt, and last.ckpt), written through AtomicCheckpointIO;
- `throughput`: images/s, tokens/s, model FLOP/s and, with `throughput.peak_flops`, MFU in TensorBoard;
- `trainer.callbacks`: learning-rate monitor, NonFiniteGuard and PreemptionCheckpoint; a config adds its own with
  `callbacks+:` (`callbacks:` replaces the list);
- TensorBoard (`core/tensorboard.py`: no placeholder `hp_metric`; the run's config with its final metrics in
  HPARAMS), seed 0.
"""

import logging
import os
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path

import jsonargparse
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from seed_lightning.core.checkpointing import checked_ckpt_path, checkpoint_dir, rename_aside, resolve_resume_path
from seed_lightning.core.data.datamodule import ShardDataModule
from seed_lightning.core.errors import ConfigError, SeedLightningError
from seed_lightning.core.io import atomic_open
from seed_lightning.core.model_checkpoint import ModelCheckpoint
from seed_lightning.core.preflight import format_cli_error, preflight_config
from seed_lightning.core.tensorboard import log_hyperparameters_with_metrics, run_hyperparameters
from seed_lightning.core.throughput import ThroughputCallback
from seed_lightning.evaluate import NO_CHECKPOINT_TO_EVALUATE, SeedTrainer

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
"""The resolved config of a training run, in its log directory beside its checkpoints."""

CALLBACK_GROUPS = {"checkpoint": ModelCheckpoint, "throughput": ThroughputCallback}
"""Callbacks every run has, each configured under its own top-level key (`checkpoint.monitor`,
`throughput.peak_flops`, ...)."""

RUN_DEFAULTS = {
    "checkpoint.filename": "best-{epoch}-{step}",
    "checkpoint.save_top_k": 1,
    "checkpoint.save_last": True,
    "trainer.logger": {"class_path": "seed_lightning.core.tensorboard.TensorBoardLogger", "init_args": {"version": ""}},
    "trainer.plugins": [{"class_path": "seed_lightning.core.checkpointing.AtomicCheckpointIO"}],
    "trainer.callbacks": [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
        {"class_path": "seed_lightning.core.nonfinite.NonFiniteGuard"},
        {"class_path": "seed_lightning.core.preemption.PreemptionCheckpoint"},
    ],
}
"""The settings every run starts from (a config or a flag overrides them)."""


def split_run_dir(root: str | None) -> tuple[str, str]:
    """(save_dir, name) of a logger that writes into the run folder `root` itself (None: the working directory)."""
    if not root:
        return ".", ""
    save_dir, name = os.path.split(os.path.normpath(root))
    return save_dir or ".", name


def checkpoints_dir(root: str | None) -> str | None:
    """Where a run in the folder `root` keeps its checkpoints (None: Lightning's choice, the same folder)."""
    return None if root is None else os.path.join(root, "checkpoints")


def link_data_to_model(parser, model_class: type) -> None:
    """What the data must share with the model is set once, on the model: an MLLM's token shards hold
    `model.model.tokens_per_image` codes per image (its tokenizer's queries), so `data.codes_per_image` follows it."""
    from seed_lightning.mllm.module import MLLMModule

    if issubclass(model_class, MLLMModule):
        parser.link_arguments(
            "model",
            "data.codes_per_image",
            compute_fn=lambda module: module.mllm.config.tokens_per_image,
            apply_on="instantiate",
        )


class RunConfigCallback(SaveConfigCallback):
    """Writes the run's config.yaml (`save_run_config`) once training has started, not at setup: a run
    that fails during setup, checkpoint restore or the sanity check leaves the folder as it was.
    `validate` and `evaluate` write none (they produce no checkpoint). When fit ends, the config goes to
    TensorBoard's HPARAMS tab with the run's final metrics."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # every rank: it broadcasts
        if trainer.is_global_zero:
            save_run_config(log_dir, self.parser.dump(self.config, skip_none=False))

    def on_fit_end(self, trainer, pl_module) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        log_hyperparameters_with_metrics(trainer, run_hyperparameters(config))


def _run_settings(config_text: str) -> dict | None:
    """A saved config's settings, less `ckpt_path` (resuming changes it); None when it is not readable YAML."""
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return None
    if isinstance(config, dict):
        config.pop("ckpt_path", None)
    return config


def save_run_config(log_dir: str | os.PathLike, text: str) -> None:
    """Write `text` as `<log_dir>/config.yaml`, keeping an earlier run's different config.

    The config beside a checkpoint must be the one that produced it. The same config again (a resumed
    run; `ckpt_path` may differ) leaves the file as it is. A different one (changed settings on resume,
    or a new run in the same folder) is written after the earlier file is renamed
    `config.<its time>.yaml`, with one info line: the earlier checkpoints keep their config.
    """
    path = Path(log_dir) / RUN_CONFIG
    if path.is_file():
        if _run_settings(path.read_text()) == _run_settings(text):
            return
        kept = rename_aside(path, ".", when=path.stat().st_mtime)
        log.info(f"{path} was written by a run with other settings: kept as {kept.name}.")
    with atomic_open(path, "w") as file:
        file.write(text)


def subclass_mode(model_class: type) -> bool:
    """Whether the YAML's `model.class_path` picks a subclass of `model_class`: the tokenizer's stages subclass
    TokenizerModule."""
    from seed_lightning.tokenizer.module import TokenizerModule

    return issubclass(model_class, TokenizerModule)


def check_checkpoint_class(model_class: type, ckpt_path: str) -> None:
    """`model_class.check_checkpoint(hyperparameters)`, where it has one, on an explicit checkpoint file: Lightning
    rebuilds the model from those hyperparameters right after parsing, and a checkpoint it cannot rebuild from gets
    one line instead of a parser trace."""
    check = getattr(model_class, "check_checkpoint", None)
    if check is not None and Path(ckpt_path).is_file():
        import torch

        check(torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True).get("hyper_parameters") or {})


def seed_error_in(error: BaseException) -> SeedLightningError | None:
    """The first SeedLightningError in `error`'s chain of causes (itself included), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SeedLightningError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class SeedCLI(LightningCLI):
    """LightningCLI over `model_class` + ShardDataModule (or `datamodule_class`) with the subcommands fit, validate
    and evaluate (`SeedTrainer.evaluate`), seed 0, one-line errors, checks before anything is built, `--ckpt_path
    last` resolved to the run's newest good last checkpoint, and config.yaml written once training starts."""

    def __init__(self, model_class: type, datamodule_class: type | None = None,
                 args: Sequence[str] | None = None) -> None:
        # Dataclass field docstrings become --help text.
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
        super().__init__(
            model_class,
            datamodule_class or ShardDataModule,
            subclass_mode_model=subclass_mode(model_class),
            trainer_class=SeedTrainer,
            seed_everything_default=0,
            save_config_callback=RunConfigCallback,
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},
            args=list(args) if args is not None else None,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Trainer method -> its arguments that the CLI fills itself (they are not options).
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "evaluate": {"model", "datamodule"},
        }

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            raise ConfigError(format_cli_error(exc, parser)) from None
        subcommand = self.config.subcommand
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path is None and subcommand == "evaluate":
            raise ConfigError(NO_CHECKPOINT_TO_EVALUATE)
        if ckpt_path not in (None, "last"):
            # Lightning reads an explicit file's hyperparameters right after parsing, before any hook. Only
            # training resumes from it: validation needs its weights alone.
            checked_ckpt_path(ckpt_path, training_state=subcommand == "fit")
            check_checkpoint_class(self.model_class, ckpt_path)

    def add_arguments_to_parser(self, parser) -> None:
        for key, callback_class in CALLBACK_GROUPS.items():
            parser.add_lightning_class_args(callback_class, key)
        parser.set_defaults(RUN_DEFAULTS)
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoints_dir)
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir",
                              compute_fn=lambda root: split_run_dir(root)[0])
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.name",
                              compute_fn=lambda root: split_run_dir(root)[1])
        link_data_to_model(parser, self.model_class)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            # A stage class (subclass mode) is built inside the parser, which wraps a constructor's one-line
            # error into a dump of the whole config: raise the error itself.
            cause = seed_error_in(error)
            if cause is None:
                raise
            raise cause from None

    def before_instantiate_classes(self) -> None:
        # Before the Trainer and the model exist: a missing file or tool fails in seconds, not after
        # minutes of model loading, and Lightning's own multi-line messages never show.
        config = self.config[self.subcommand]
        if config.trainer.enable_checkpointing is False:  # Lightning would refuse the `checkpoint` callback
            raise ConfigError("trainer.enable_checkpointing: every run has a checkpoint callback; to save no "
                              "checkpoint, set checkpoint.save_top_k: 0 and checkpoint.save_last: false instead")
        stage = "fit" if self.subcommand == "fit" else "validate"  # the Trainer stage the subcommand runs
        preflight_config(config, self.model_class, self.datamodule_class, stage)

    def _resolve_ckpt_path(self) -> None:
        arguments = self.config_init[self.subcommand]
        arguments["ckpt_path"] = resolve_resume_path(arguments.get("ckpt_path"), checkpoint_dir(self.trainer))

    def before_fit(self) -> None:
        self._resolve_ckpt_path()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_evaluate(self) -> None:
        self._resolve_ckpt_path()
        if self.config_init["evaluate"]["ckpt_path"] is None:
            raise ConfigError(f"no checkpoint to evaluate in {checkpoint_dir(self.trainer)}; pass --ckpt_path FILE")


class _Parsed(Exception):
    """Ends a parse-only SeedCLI (see `effective_config`), carrying the parsed config."""

    def __init__(self, config: dict) -> None:
        super().__init__("parsed")
        self.config = config


def effective_config(model_class: type, args: Sequence[str]) -> dict:
    """The settings that `args` (SUBCOMMAND -c CONFIG ... --key value ...) give a `SeedCLI(model_class)` run: the
    config files, the command-line values, the defaults and the values derived from others, as one dict of
    plain data (what --print_config shows, plus the derived values). Nothing is checked or built."""

    class ParseOnly(SeedCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:  # the parser of the one subcommand asked for is enough
            return {name: skip for name, skip in SeedCLI.subcommands().items() if name in args}

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            text = parser.dump(self.config, skip_link_targets=False, skip_none=False)
            raise _Parsed(yaml.safe_load(text)[self.config.subcommand])

    try:
        ParseOnly(model_class, args=args)
    except _Parsed as parsed:
        return parsed.config
    raise AssertionError("ParseOnly always stops after parsing")
