"""The TensorBoard a user opens: no placeholder hp_metric, `epoch` among the training charts, and the run's
hyperparameters logged with its final metrics (the HPARAMS tab)."""

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.data import DataLoader

from seed_lightning.core.optim import OptimConfig, build_scheduler
from seed_lightning.core.tensorboard import TensorBoardLogger, log_hyperparameters_with_metrics, run_hyperparameters

CONFIG = {
    "seed_everything": 0,
    "ckpt_path": "last",
    "trainer": {"max_epochs": 2, "precision": "32-true", "callbacks": [{"class_path": "x.Y"}], "logger": {}},
    "model": {"optim": {"lr": 0.001, "betas": [0.9, 0.95]}, "stage": "codebook", "compile": False},
    "data": {"batch_size": 4, "val": None},
}


class Scorer(L.LightningModule):
    """Logs a training loss and a val score that rises with the epoch; has hyperparameters, as the SEED modules do
    (Lightning logs them at the start of fit)."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        loss = (self.weight * batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/score", float(10 + self.current_epoch))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        config = OptimConfig(lr=self.hparams.lr, min_lr=0.0, warmup_steps=1)
        return {"optimizer": optimizer, "lr_scheduler": build_scheduler(optimizer, config, total_steps=4)}


class LogHyperparametersAtFitEnd(L.Callback):
    """What the CLI's config callback does when fit ends."""

    def on_fit_end(self, trainer, pl_module):
        log_hyperparameters_with_metrics(trainer, run_hyperparameters(CONFIG))


def fit(tmp_path, logger, callbacks=()):
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=logger, callbacks=list(callbacks), log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    data = DataLoader(torch.randn(4, 2), batch_size=2)
    trainer.fit(Scorer(), data, data)
    return trainer


def events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return accumulator


def test_no_placeholder_hp_metric_and_epoch_and_learning_rate_are_training_charts(tmp_path):
    fit(tmp_path, TensorBoardLogger(tmp_path, name="run", version=""), [LearningRateMonitor(logging_interval="step")])
    tags = events(tmp_path / "run").Tags()["scalars"]
    assert set(tags) == {"train/epoch", "train/lr", "train/loss", "val/score"}


def test_hyperparameters_are_logged_with_the_final_metrics(tmp_path):
    trainer = fit(tmp_path, TensorBoardLogger(tmp_path, name="run", version=""), [LogHyperparametersAtFitEnd()])
    accumulator = events(tmp_path / "run")
    plugin = {tag: HParamsPluginData.FromString(content)
              for tag, content in accumulator.PluginTagToContent("hparams").items()}
    metric_tags = [info.name.tag for info in plugin["_hparams_/experiment"].experiment.metric_infos]
    assert metric_tags == ["val/score"]
    hparams = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["model.optim.lr"].number_value == 0.001
    assert hparams["model.optim.betas"].string_value == "[0.9, 0.95]"
    assert hparams["model.stage"].string_value == "codebook"
    assert hparams["model.compile"].bool_value is False
    assert hparams["trainer.max_epochs"].number_value == 2
    assert not {"ckpt_path", "trainer.callbacks", "trainer.logger"} & set(hparams)
    # The HPARAMS tab shows the run's last val/score; the curve keeps one point per validation, none added.
    assert [event.value for event in accumulator.Scalars("val/score")] == [10.0, 11.0]
    assert "hp_metric" not in accumulator.Tags()["scalars"]


def test_lightnings_default_logger_would_write_the_placeholder(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

    fit(tmp_path, LightningTensorBoardLogger(tmp_path, name="run", version=""))
    assert "hp_metric" in events(tmp_path / "run").Tags()["scalars"]  # what the configs' logger avoids


def test_a_run_without_validation_is_compared_by_its_last_training_loss_curve_unchanged(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=TensorBoardLogger(tmp_path, name="run", version=""),
                        callbacks=[LogHyperparametersAtFitEnd()], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(Scorer(), DataLoader(torch.randn(4, 2), batch_size=2))
    run = events(tmp_path / "run")
    plugin = HParamsPluginData.FromString(run.PluginTagToContent("hparams")["_hparams_/experiment"])
    assert [info.name.tag for info in plugin.experiment.metric_infos] == ["train/loss"]
    assert [event.step for event in run.Scalars("train/loss")] == [0, 1]


def test_a_class_given_by_class_path_has_its_arguments_under_its_own_key():
    config = {"model": {"class_path": "seed_lightning.tokenizer.contrastive.ContrastiveModule",
                        "init_args": {"optim": {"lr": 5e-4}, "compile": False}},
              "trainer": {"logger": {"class_path": "x"}, "max_epochs": 5}}
    assert run_hyperparameters(config) == {"model": "seed_lightning.tokenizer.contrastive.ContrastiveModule",
                                           "model.optim.lr": 5e-4, "model.compile": False, "trainer.max_epochs": 5}
