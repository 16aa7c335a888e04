"""Evaluate a checkpoint with the validation callbacks of its config, outside training.

    python -m seed_lightning.evaluate tokenizer --ckpt CKPT --config conf/tokenizer/tiny.yaml [--config MORE.yaml]
    python -m seed_lightning.evaluate mllm --ckpt CKPT --config conf/mllm/tiny.yaml [--out results.json]

Builds the LightningModule, ShardDataModule and Trainer (with its configured callbacks: caption
metrics, VQA accuracy, CLIP score, ...) from the YAML exactly as `seed-lightning ... fit` does, runs
``trainer.validate`` on the checkpoint, prints a (metric, value) table and writes it as JSON
(default: results.json next to the checkpoint). Further ``--key value`` arguments after the options
override config keys, e.g. ``--trainer.logger false``.
"""

import argparse
import json
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path

from seed_lightning.cli import silence_expected_warnings
from seed_lightning.core.errors import ConfigError, SeedLightningError

MODEL_CLASSES = {
    "tokenizer": "seed_lightning.tokenizer.module:TokenizerModule",
    "mllm": "seed_lightning.mllm.module:MLLMModule",
}


def load_model_class(kind: str) -> type:
    module_name, class_name = MODEL_CLASSES[kind].split(":")
    try:
        module = __import__(module_name, fromlist=[class_name])
    except ModuleNotFoundError as error:
        raise ConfigError(f"cannot evaluate {kind!r}: {module_name} is not available ({error})") from None
    return getattr(module, class_name)


def evaluate(
    model_class: type,
    configs: Sequence[str],
    ckpt: str,
    out: str | None = None,
    overrides: Sequence[str] = (),
    datamodule_class: type | None = None,
) -> dict[str, float]:
    """Validate `ckpt` with the module/data/trainer of `configs`; returns {metric: value} and writes it as JSON."""
    checkpoint = Path(ckpt)
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {ckpt!r} does not exist: pass --ckpt PATH/TO/last.ckpt (or best-*.ckpt)")
    for config in configs:
        if not Path(config).is_file():
            raise ConfigError(f"config file {config!r} does not exist: pass --config conf/<model>/<name>.yaml")
    from seed_lightning.core.checkpointing import checkpoint_problem

    problem = checkpoint_problem(checkpoint, training_state=False)
    if problem is not None:
        raise ConfigError(
            f"cannot evaluate checkpoint {ckpt}: {problem}; pass another --ckpt (e.g. its .prev.ckpt twin)"
        )
    import jsonargparse
    from lightning.pytorch.cli import LightningCLI

    from seed_lightning.cli import link_data_to_model, subclass_mode
    from seed_lightning.core.preflight import format_cli_error, preflight_config

    if datamodule_class is None:
        from seed_lightning.core.data.datamodule import ShardDataModule as datamodule_class

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class EvaluationCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            link_data_to_model(parser, self.model_class)

        def parse_arguments(self, parser, args):
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as exc:
                raise ConfigError(format_cli_error(exc, parser)) from None

        def before_instantiate_classes(self) -> None:
            preflight_config(self.config, self.model_class, self.datamodule_class, "validate")

    args = [argument for config in configs for argument in ("--config", config)] + list(overrides)
    cli = EvaluationCLI(
        model_class,
        datamodule_class,
        args=args,
        run=False,
        subclass_mode_model=subclass_mode(model_class),
        save_config_callback=None,  # the training run's config.yaml stays as it is
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False},
    )
    results = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=str(checkpoint), verbose=False)
    metrics = {name: float(value) for result in results for name, value in sorted(result.items())}
    if cli.trainer.is_global_zero:
        print(format_table(metrics))
        out_path = Path(out) if out is not None else checkpoint.parent / "results.json"
        from seed_lightning.core.io import write_json_atomic

        write_json_atomic(out_path, {"checkpoint": str(checkpoint), "configs": list(configs), "metrics": metrics})
        print(f"results written to {out_path}")
    return metrics


def format_table(metrics: dict[str, float]) -> str:
    """Two aligned columns, metric and value, one metric per line."""
    width = max([len("metric"), *(len(name) for name in metrics)])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{name:<{width}}  {value:.4f}" for name, value in metrics.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seed_lightning.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(MODEL_CLASSES), help="which LightningModule the checkpoint holds")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint to evaluate")
    parser.add_argument("--config", action="append", required=True, help="YAML config (repeat to layer several)")
    parser.add_argument("--out", default=None, help="results JSON (default: results.json beside the checkpoint)")
    args, overrides = parser.parse_known_args(argv)
    silence_expected_warnings()
    try:
        evaluate(load_model_class(args.kind), args.config, args.ckpt, args.out, overrides)
    except SeedLightningError as error:
        print(f"seed_lightning.evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
