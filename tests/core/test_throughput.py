import time

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.throughput import ThroughputCallback, default_counts, linear_flops_per_token

STEP_SECONDS = 0.02
BATCH = 4
TOKENS_PER_SAMPLE = 5


class SleepyModule(L.LightningModule):
    """Each step takes at least STEP_SECONDS; every batch has BATCH samples of TOKENS_PER_SAMPLE tokens."""

    def __init__(self, with_hooks: bool = True):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        if with_hooks:
            self.throughput_counts = lambda batch: (batch["x"].shape[0], int(batch["mask"].sum()))
            self.flops_per_token = lambda: 1e6

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_SECONDS)
        return self.layer(batch["x"]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches(count: int) -> list[dict]:
    mask = torch.zeros(BATCH, 8, dtype=torch.bool)
    mask[:, :TOKENS_PER_SAMPLE] = True
    return [{"x": torch.randn(BATCH, 2), "mask": mask} for _ in range(count)]


def fit(module, callback, steps: int, tmp_path, logger=False, epochs: int = 1, log_every_n_steps: int = 1):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps * epochs, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        default_root_dir=tmp_path, log_every_n_steps=log_every_n_steps)
    trainer.fit(module, torch.utils.data.DataLoader(batches(steps), batch_size=None))


def test_rates_and_mfu_follow_the_step_time(tmp_path):
    torch.manual_seed(0)
    callback = ThroughputCallback(peak_flops=1e9, log_every_n_steps=3, skip_first_steps=1)
    fit(SleepyModule(), callback, steps=7, tmp_path=tmp_path)
    assert len(callback.history) == 2  # batches 2-4 and 5-7 after the skipped first
    for point in callback.history:
        # A step takes at least STEP_SECONDS (plus loop overhead), so rates are bounded above.
        assert 0.3 * BATCH / STEP_SECONDS < point["samples_per_sec"] <= BATCH / STEP_SECONDS
        assert point["tokens_per_sec"] == pytest.approx(point["samples_per_sec"] * TOKENS_PER_SAMPLE)
        assert point["flops_per_sec"] == pytest.approx(point["tokens_per_sec"] * 1e6)
        assert point["mfu"] == pytest.approx(point["flops_per_sec"] / 1e9)


def test_logs_to_tensorboard(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    fit(SleepyModule(), ThroughputCallback(peak_flops=1e9, log_every_n_steps=2, skip_first_steps=0), 5, tmp_path, logger)
    events = EventAccumulator(str(tmp_path / "run" / "version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"throughput/samples_per_sec", "throughput/tokens_per_sec", "throughput/mfu"} <= tags
    assert len(events.Scalars("throughput/samples_per_sec")) == 2


class ShrinkingModule(SleepyModule):
    """No hooks; in the first epoch a step runs one more trainable layer than in the later ones."""

    def __init__(self):
        super().__init__(with_hooks=False)
        self.first = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        x = self.first(batch["x"]) if self.current_epoch == 0 else batch["x"]
        return super().training_step({"x": x}, batch_idx)


def test_without_hooks_counts_rows_and_measures_the_flops_of_each_epoch(tmp_path):
    callback = ThroughputCallback(peak_flops=1e3, log_every_n_steps=2, skip_first_steps=1)
    fit(ShrinkingModule(), callback, steps=5, epochs=2, tmp_path=tmp_path)
    # Matmul FLOPs per sample, forward and backward as autograd runs them (2 per multiply-add): epoch 0,
    # Linear(2, 2) forward 8 + weight gradient 8 (the input needs none), then Linear(2, 1) forward 4 + weight
    # gradient 4 + input gradient 4; later epochs, Linear(2, 1) alone: 4 + 4.
    flops_per_sample = [point["flops_per_sec"] / point["samples_per_sec"] for point in callback.history]
    assert flops_per_sample == pytest.approx([28, 28, 8, 8])  # the first batch of each epoch is measured, not timed
    for point in callback.history:
        assert point["tokens_per_sec"] == point["samples_per_sec"]
        assert point["mfu"] == pytest.approx(point["flops_per_sec"] / 1e3)


def test_the_window_follows_the_trainers_log_every_n_steps(tmp_path):
    callback = ThroughputCallback(skip_first_steps=0)
    fit(SleepyModule(), callback, steps=7, tmp_path=tmp_path, log_every_n_steps=3)
    assert len(callback.history) == 2  # windows end at batches 3 and 6 (the first batch opens the window)
    assert "mfu" not in callback.history[0] and "flops_per_sec" in callback.history[0]


def test_linear_flops_per_token_counts_6n_for_trainable_and_4n_for_frozen_weights():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.GELU(), torch.nn.Linear(5, 2))
    model[0].requires_grad_(False)
    assert linear_flops_per_token(model) == (4 * 15 + 6 * 10, 25)


def test_default_counts():
    assert default_counts({"caption": ["a", "b", "c"], "pixel_values": torch.zeros(3, 1)}) == (3, 3)
    assert default_counts({"codes": torch.zeros(2, 32)}) == (2, 2)
    with pytest.raises(ConfigError, match="throughput_counts"):
        default_counts({"n": 3})


@pytest.mark.parametrize("kwargs", [{"peak_flops": 0}, {"log_every_n_steps": 0}, {"skip_first_steps": -1}])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        ThroughputCallback(**kwargs)
