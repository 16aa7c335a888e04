import copy
import csv

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from seed_lightning.core.checkpointing import checkpoint_problem
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.nonfinite import (
    NONFINITE_EXIT_CODE,
    SKIPPED_STEPS_METRIC,
    NonFiniteGuard,
    NonFiniteTrainingError,
)


class Faulty(LightningModule):
    """Linear regression whose loss (or weight gradient) turns NaN/Inf at chosen optimiser steps (or batches)."""

    def __init__(self, bad_loss_steps=(), bad_grad_steps=(), bad_value=float("nan"), bad_loss_batches=()):
        super().__init__()
        self.bad_loss_steps, self.bad_grad_steps, self.bad_value = set(bad_loss_steps), set(bad_grad_steps), bad_value
        self.bad_loss_batches = set(bad_loss_batches)
        self.layer = nn.Linear(4, 1)
        self.layer.weight.register_hook(self._poison_gradient)

    def _poison_gradient(self, grad):
        return grad * self.bad_value if self.global_step in self.bad_grad_steps else grad

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        bad = self.global_step in self.bad_loss_steps or batch_idx in self.bad_loss_batches
        return loss * self.bad_value if bad else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(96, 4, generator=generator), torch.randn(96, 1, generator=generator))
        return DataLoader(data, batch_size=8)


class StepRecorder(Callback):
    """Parameters and optimiser state before and after every optimiser step, keyed by step index."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def snapshot(trainer, pl_module):
        params = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        return params, copy.deepcopy(trainer.optimizers[0].state_dict()["state"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.setdefault(trainer.global_step, self.snapshot(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self.snapshot(trainer, pl_module)


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def train(tmp_path, module, max_steps=6, guard=None, **trainer_kwargs):
    torch.manual_seed(0)
    recorder = StepRecorder()
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[recorder, guard or NonFiniteGuard()],
        **trainer_kwargs,
    )
    return trainer, recorder


def logged_counts(tmp_path) -> list[float]:
    with open(tmp_path / "metrics.csv") as file:
        return [float(row[SKIPPED_STEPS_METRIC]) for row in csv.DictReader(file) if row[SKIPPED_STEPS_METRIC]]


@pytest.mark.parametrize(
    "fault", [dict(bad_loss_steps={3}), dict(bad_grad_steps={3}), dict(bad_grad_steps={3}, bad_value=float("inf"))]
)
def test_a_bad_step_is_skipped_and_counted(tmp_path, fault):
    trainer, recorder = train(tmp_path, module := Faulty(**fault))
    trainer.fit(module)

    params_before, state_before = recorder.before[3]
    params_after, state_after = recorder.after[3]
    assert same(params_before, params_after)  # no update and no weight decay
    assert same(state_before, state_after)  # AdamW moments and step counts untouched
    for step in (2, 4):
        assert not same(recorder.before[step][0], recorder.after[step][0])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert logged_counts(tmp_path) == [0, 0, 0, 1, 1, 1]


def test_a_nan_micro_batch_skips_the_whole_accumulated_step(tmp_path):
    module = Faulty(bad_loss_batches={3})  # the second micro-batch of step 1
    trainer, recorder = train(tmp_path, module, max_steps=3, accumulate_grad_batches=2)
    trainer.fit(module)
    assert same(recorder.before[1][0], recorder.after[1][0])
    assert not same(recorder.before[2][0], recorder.after[2][0])


def test_consecutive_bad_steps_stop_the_run_with_the_pre_blowup_weights(tmp_path):
    module = Faulty(bad_loss_steps=range(2, 100))
    trainer, recorder = train(tmp_path, module, max_steps=20, guard=NonFiniteGuard(max_consecutive=3))
    with pytest.raises(NonFiniteTrainingError) as error:
        trainer.fit(module)

    message = str(error.value)
    assert "\n" not in message and "steps 2-4" in message and error.value.checkpoint_path in message
    assert error.value.exit_code == NONFINITE_EXIT_CODE
    assert trainer.global_step == 5
    checkpoint = torch.load(error.value.checkpoint_path, weights_only=False)
    assert checkpoint_problem(error.value.checkpoint_path) is None
    pre_blowup = recorder.before[2][0]
    assert same({k: checkpoint["state_dict"][k] for k in pre_blowup}, pre_blowup)
    assert not same(recorder.before[1][0], pre_blowup)  # the weights did train before the blow-up


def test_fp16_gradient_overflow_is_left_to_the_grad_scaler(tmp_path):
    scaler = torch.amp.GradScaler("cpu")
    module = Faulty(bad_grad_steps={2}, bad_value=float("inf"), bad_loss_steps={4})
    trainer, recorder = train(tmp_path, module, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module)
    for step in (2, 4):  # both skipped: by the scaler, then by the guard
        assert same(recorder.before[step][0], recorder.after[step][0])
    assert logged_counts(tmp_path) == [0, 0, 0, 0, 1, 1]  # the overflow is the scaler's business


def test_max_consecutive_must_be_positive():
    with pytest.raises(ConfigError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)
