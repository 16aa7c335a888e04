"""TensorBoard as a user reads it: the charts they came for, and one HPARAMS row per run with its results.

- No placeholder ``hp_metric`` (-1) chart: Lightning writes one at the start of every run unless told not to.
- Lightning's automatic ``epoch`` scalar and the learning rate go to ``train/epoch`` and ``train/lr``, among the
  training charts, instead of sections of their own above them: the dashboard has a ``train`` and a ``val``
  section (plus ``data`` when samples were skipped).
- At the end of fit (rank 0) the run's hyperparameters are logged together with its final metrics, so the
  HPARAMS tab compares runs by their results.
"""

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from torch.utils.tensorboard.summary import hparams

EPOCH_TAG = "train/epoch"
"""Where Lightning's automatic `epoch` scalar is shown."""
LEARNING_RATE_TAG = "train/lr"
"""The learning rate's chart (LearningRateMonitor's name for the schedule; its own default is `lr-AdamW`)."""

NOT_HYPERPARAMETERS = ("ckpt_path", "trainer.callbacks", "trainer.logger", "trainer.plugins")
"""Config entries left out of the HPARAMS table: where a run resumed from, and lists of classes: not settings
two runs are compared by."""


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger without the placeholder `hp_metric` and with `epoch` under `train/`
    (see the module docstring)."""

    def __init__(
        self,
        save_dir: str,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = False,
        prefix: str = "",
        sub_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            save_dir: Folder of the runs; this run's events go to save_dir/name/version.
            name: The run's name (a folder under save_dir; TensorBoard's run name).
            version: A sub-folder of the run ("" for none; None: version_0, version_1, ... by run).
            log_graph: Add the model's graph (needs the module's `example_input_array`).
            default_hp_metric: Write Lightning's placeholder `hp_metric` = -1 at the start of the run.
            prefix: Prepended to every scalar tag.
            sub_dir: A folder under the run's folder for the events.
        """
        super().__init__(save_dir, name=name, version=version, log_graph=log_graph,
                         default_hp_metric=default_hp_metric, prefix=prefix, sub_dir=sub_dir, **kwargs)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if "epoch" in metrics:
            metrics = {EPOCH_TAG if name == "epoch" else name: value for name, value in metrics.items()}
        super().log_metrics(metrics, step)


def run_hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's resolved CLI config as HPARAMS columns: nested keys joined with "." as on the command line
    (`model.optim.lr`, `data.batch_size`, `trainer.max_epochs`), lists as text, NOT_HYPERPARAMETERS left out. A class
    given as `class_path` + `init_args` (the tokenizer's stage classes) is its class path under its own key and its
    arguments under that key too (`model: ...ContrastiveModule`, `model.optim.lr`), so runs of either form line up."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if prefix in NOT_HYPERPARAMETERS:
            return
        if isinstance(value, Mapping) and "class_path" in value and set(value) <= {"class_path", "init_args"}:
            flat[prefix] = value["class_path"]
            visit(prefix, value.get("init_args") or {})
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    visit("", config)
    return flat


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The run's last value of every `val/` metric; a run without validation: its last `train/loss`."""
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
    if not metrics and "train/loss" in trainer.callback_metrics:
        metrics["train/loss"] = float(trainer.callback_metrics["train/loss"])
    return metrics


def log_hyperparameters_with_metrics(trainer: L.Trainer, hyperparameters: Mapping[str, Any]) -> None:
    """Add the HPARAMS row of `hyperparameters` with the run's `final_metrics` to every TensorBoard logger, on rank 0
    (call it when fit ends: the HPARAMS tab then lines runs up by their results).

    Only the HPARAMS summaries are written: the tab reads each metric's value from the run's own scalars of that
    name, and re-logging them (what `log_hyperparams(params, metrics)` does) would add a point to every curve.
    """
    metrics = final_metrics(trainer)
    if not trainer.is_global_zero or not metrics:
        return
    summaries = hparams(dict(hyperparameters), metrics)
    for logger in trainer.loggers:
        if isinstance(logger, LightningTensorBoardLogger):
            writer = logger.experiment._get_file_writer()  # the run's own events file, not a sub-run
            for summary in summaries:
                writer.add_summary(summary)
            writer.flush()
