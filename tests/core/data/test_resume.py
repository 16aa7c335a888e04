"""A run killed (SIGKILL) right after a checkpoint and resumed from `last.ckpt` sees exactly the batches, losses and
skip counts of an uninterrupted run: mid-epoch, at an epoch's end and across epoch boundaries, with 2 workers.

Each training runs in a subprocess of this file (`python test_resume.py ARGS_JSON`).
"""

import io
import json
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image
from webdataset import TarWriter

from tests.cli_runs import REPO, free_ports

STEPS_PER_EPOCH = 5  # samples_per_epoch 20 / batch 4: odd, so the worker round-robin shifts every epoch
EPOCHS = 3


def write_shards(folder) -> None:
    def jpeg(shade: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (12, 9), (shade, 255 - shade, (shade * 7) % 256)).save(buffer, format="JPEG")
        return buffer.getvalue()

    for shard in range(3):
        with TarWriter(str(folder / f"a-{shard}.tar"), mtime=0) as writer:
            for i in range(6):
                number = shard * 6 + i
                sample = {"__key__": f"a{shard}_{i}", "jpg": jpeg(number * 13 % 256), "txt": "word " * (1 + number % 5)}
                if number == 4:
                    sample["jpg"] = b"corrupt"
                if number == 9:
                    del sample["txt"]
                writer.write(sample)
    with TarWriter(str(folder / "b-0.tar"), mtime=0) as writer:
        for i in range(4):
            writer.write({"__key__": f"b_{i}", "jpg": jpeg(200 - i * 30), "txt": "a longer caption " * (i + 1)})


def train(shard_dir: str, root: str, log_path: str, kill_at_step: int | None, resume: bool, ranks: int) -> None:
    import lightning.pytorch as pl
    import torch

    from seed_lightning.core.data.datamodule import ShardDataModule, ShardSource

    torch.set_num_threads(1)

    class MeanColourRegression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            target = torch.tensor([len(c.split()) / 10 for c in batch["caption"]])
            prediction = self.linear(batch["pixel_values"].mean(dim=(2, 3))).squeeze(1)
            return torch.nn.functional.mse_loss(prediction, target)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    class Recorder(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == kill_at_step:  # the checkpoint of the previous step is on disk
                os.killpg(os.getpgid(0), signal.SIGKILL)  # every rank and DataLoader worker at once

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record = {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "loss": outputs["loss"].item(),
                "keys": batch["key"],
                "skipped": trainer.datamodule.skipped,
            }
            with open(f"{log_path}.rank{trainer.global_rank}", "a") as log:
                log.write(json.dumps(record) + "\n")

    pl.seed_everything(0, verbose=False)
    data = ShardDataModule(
        train=[ShardSource(f"{shard_dir}/a-{{0..2}}.tar", 3.0), ShardSource(f"{shard_dir}/b-0.tar", 1.0)],
        image_size=8,
        batch_size=4,
        num_workers=2,
        samples_per_epoch=4 * STEPS_PER_EPOCH * ranks,
        shuffle_buffer=5,
        seed=1,
    )
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=1, save_last=True)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=ranks,
        strategy="ddp" if ranks > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Recorder(), checkpoints],
        default_root_dir=root,
    )
    trainer.fit(MeanColourRegression(), datamodule=data, ckpt_path=f"{root}/checkpoints/last.ckpt" if resume else None)


def launch(shard_dir, root, log_path, kill_at_step, resume, ranks, port) -> subprocess.Popen:
    """Start one training; its stderr goes to `root`.err (a file: an unread pipe could fill up and block it)."""
    arguments = json.dumps([str(shard_dir), str(root), str(log_path), kill_at_step, resume, ranks])
    repository = str(REPO)
    environment = {**os.environ, "PYTHONPATH": repository, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with open(f"{root}.err", "a") as errors:
        return subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), arguments],
            env=environment,
            stderr=errors,
            start_new_session=True,  # its own process group, which the kill takes down whole
        )


def finish(run: subprocess.Popen, root, expected_returncode: int) -> None:
    run.wait(timeout=240)
    with open(f"{root}.err") as errors:
        output = errors.read()
    assert run.returncode == expected_returncode, output[-3000:]
    assert "not resumable" not in output


def records(log_path, rank: int) -> list[dict]:
    with open(f"{log_path}.rank{rank}") as log:
        return [json.loads(line) for line in log]


def check_kill_and_resume(tmp_path, kills: list[int], ranks: int) -> None:
    write_shards(tmp_path)
    ports = free_ports(len(kills) + 2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    runs = [launch(tmp_path, straight, f"{straight}.jsonl", None, False, ranks, ports.pop())]
    try:
        for number, kill_at_step in enumerate([*kills, None]):
            runs.append(launch(tmp_path, killed, f"{killed}.jsonl", kill_at_step, number > 0, ranks, ports.pop()))
            finish(runs[-1], killed, -signal.SIGKILL if kill_at_step else 0)
        finish(runs[0], straight, 0)
    finally:
        for run in runs:
            if run.poll() is None:  # timed out: take down its ranks and DataLoader workers
                os.killpg(run.pid, signal.SIGKILL)

    for rank in range(ranks):
        expected, resumed = records(tmp_path / "straight.jsonl", rank), records(tmp_path / "killed.jsonl", rank)
        assert len(expected) == STEPS_PER_EPOCH * EPOCHS
        assert [r["step"] for r in resumed] == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
        for straight, again in zip(expected, resumed):
            for field in ("step", "epoch", "keys", "loss", "skipped"):
                assert again[field] == straight[field], (rank, straight["step"], field)
    assert records(tmp_path / "straight.jsonl", 0)[-1]["skipped"].get("corrupt_image", 0) > 0  # bad samples were met


@pytest.mark.slow
def test_killed_and_resumed_training_sees_exactly_the_same_batches(tmp_path):
    # Killed mid-epoch 0, resumed and killed at the end of epoch 0, resumed to the end (crossing epoch 1 -> 2).
    check_kill_and_resume(tmp_path, kills=[3, STEPS_PER_EPOCH], ranks=1)


@pytest.mark.slow
def test_killed_and_resumed_ddp_training_sees_exactly_the_same_batches_on_every_rank(tmp_path):
    # Two CPU ranks (gloo): the datamodule state of both ranks must reach rank 0's checkpoint.
    check_kill_and_resume(tmp_path, kills=[7], ranks=2)


if __name__ == "__main__":
    train(*json.loads(sys.argv[1]))
