import pytest
from tests.faults.regression import Regression
import torch
from lightning.pytorch import Trainer

from seed_lightning.core.checkpointing import AtomicCheckpointIO, checkpoint_problem
from seed_lightning.core.model_checkpoint import ModelCheckpoint


class CountingCheckpointIO(AtomicCheckpointIO):
    def __init__(self):
        super().__init__()
        self.saved = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved.append((path.rpartition("/")[2], checkpoint["global_step"]))
        super().save_checkpoint(checkpoint, path, storage_options)


def fit(tmp_path, max_steps: int, every_n_train_steps: int) -> list[tuple[str, int]]:
    """Trains `max_steps` steps without validation; returns (file name, step) of every checkpoint written."""
    torch.manual_seed(0)
    io = CountingCheckpointIO()
    trainer = Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0, plugins=[io],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=every_n_train_steps)],
    )
    trainer.fit(Regression())
    return io.saved


@pytest.mark.parametrize("every_n_train_steps", [500, 2])
def test_a_run_ending_between_two_saves_leaves_last_at_its_final_step(tmp_path, every_n_train_steps):
    fit(tmp_path, max_steps=3, every_n_train_steps=every_n_train_steps)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert checkpoint_problem(last) is None  # a complete training state, resumable
    assert torch.load(last, weights_only=False)["global_step"] == 3


def test_last_is_not_written_twice_when_the_final_step_saved_it(tmp_path):
    saved = fit(tmp_path, max_steps=4, every_n_train_steps=2)
    assert [name for name, step in saved if name == "last.ckpt"] == ["last.ckpt", "last.ckpt"]
    assert [step for name, step in saved if name == "last.ckpt"] == [2, 4]
