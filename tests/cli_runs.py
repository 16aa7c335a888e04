"""Run the real commands (`seed-lightning`, torchrun) in subprocesses, as users do,
on one process or on several CPU processes (DDP over gloo), and compare what two evaluations report."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from webdataset import TarWriter

from seed_lightning.core.data.shards import iter_tar_samples

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "seed_lightning.cli"]
DATA_STREAM_WARNING = "data stream does not match"
"""ShardDataModule's complaint on restoring a train stream of another configuration (never in an evaluation)."""


def free_ports(count: int) -> list[int]:
    """Distinct free ports (all held open while chosen), one per DDP run, so concurrent runs never share one."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def run_together(commands: Sequence[Sequence[str]], logs: Sequence[Path], timeout: float,
                 envs: Sequence[dict | None] | None = None) -> list[int | None]:
    """Run `commands` at the same time (the nodes of one multi-node launch) from the repository root, the output
    of each appended to its log and its extra `envs` entry set, each in its own process group, which is killed
    whole when the command ends or after `timeout` s in all (DDP ranks and DataLoader workers included). Returns
    their exit statuses, None for one still running at the timeout."""
    search_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    base = {**os.environ, "PYTHONPATH": search_path, "SEED_LOG_LEVEL": "WARNING"}
    processes = []
    try:
        for command, log, env in zip(commands, logs, envs or [None] * len(commands), strict=True):
            with open(log, "a") as output:
                processes.append(subprocess.Popen(list(command), cwd=REPO, env={**base, **(env or {})}, stdout=output,
                                                  stderr=output, start_new_session=True))
        deadline = time.monotonic() + timeout
        statuses: list[int | None] = []
        for process in processes:
            try:
                statuses.append(process.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                statuses.append(None)
        return statuses
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_in_own_group(command: Sequence[str], log: Path, timeout: float, env: dict | None = None) -> int:
    """`run_together` of one command; fails the test with the log's tail when it runs past `timeout`."""
    [status] = run_together([command], [log], timeout, [env])
    if status is None:
        pytest.fail(f"{' '.join(command[:4])} ... ran past {timeout} s:\n{log.read_text()[-3000:]}")
    return status


def torchrun(nodes: int, per_node: int, port: int, node_rank: int = 0) -> list[str]:
    """The torchrun launcher of node `node_rank` of `nodes` x `per_node` processes, rendezvous at 127.0.0.1:`port`
    (several nodes on this one host); the module to run follows it (`-m seed_lightning.cli ...`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node-rank", str(node_rank),
            "--nproc-per-node", str(per_node), "--master-addr", "127.0.0.1", "--master-port", str(port)]


def run_ok(command: Sequence[str], log: Path, timeout: float = 300, devices: int = 1,
           threads: int | None = None) -> str:
    """Run `command` (on `devices` CPU processes: appends the Trainer options for DDP over gloo on a port of its
    own; with `threads` torch threads per process, else Lightning's choice: the cores shared out); fail with the
    log's tail unless it exits 0. Returns the log."""
    command, env = list(command), {}
    if devices > 1:
        command += ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", "ddp"]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_ports(1)[0]))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    status = run_in_own_group(command, log, timeout, env)
    text = log.read_text()
    assert status == 0, f"exit status {status}:\n{text[-4000:]}"
    return text


def evaluate(kind: str, ckpt: Path, configs: Sequence[Path | str], out_dir: Path, devices: int,
             threads: int | None = None, timeout: float = 300) -> dict[str, float]:
    """`seed-lightning KIND evaluate` on `devices` processes (see `run_ok`); results, result files and log
    in `out_dir` (the run folder: the logger writes there). Returns the printed metrics."""
    out_dir.mkdir(parents=True)
    command = [*CLI, kind, "evaluate", *(f"--config={config}" for config in configs), "--ckpt_path", str(ckpt),
               "--out", str(out_dir / "results.json"), "--trainer.default_root_dir", str(out_dir)]
    log = run_ok(command, out_dir / "log.txt", timeout, devices, threads)
    assert DATA_STREAM_WARNING not in log
    return json.loads((out_dir / "results.json").read_text())["metrics"]


def assert_same_evaluation(one: Path, two: Path, losses: Sequence[str]) -> dict[str, float]:
    """The evaluations written to `one` and `two` (see `evaluate`) report the same metrics and wrote byte-identical
    result files (predictions, accuracy reports, image grids). `losses` are float64 sums over the same batches in
    another order, so their float32 value may differ in the last bit."""
    metrics_one = json.loads((one / "results.json").read_text())["metrics"]
    metrics_two = json.loads((two / "results.json").read_text())["metrics"]
    assert sorted(metrics_one) == sorted(metrics_two)
    exact = {name: value for name, value in metrics_one.items() if name not in losses}
    assert {name: metrics_two[name] for name in exact} == exact
    for name in losses:
        assert metrics_two[name] == pytest.approx(metrics_one[name], rel=1e-6), name
    files_one = sorted(path.relative_to(one) for path in one.rglob("*") if path.suffix in (".json", ".png"))
    files_two = sorted(path.relative_to(two) for path in two.rglob("*") if path.suffix in (".json", ".png"))
    assert files_one == files_two
    for path in files_one:
        if path.name != "results.json":  # it names its own checkpoint and configs
            assert (one / path).read_bytes() == (two / path).read_bytes(), path
    return metrics_one


CLIP_SCORE_CALLBACK = """\
    - class_path: seed_lightning.tokenizer.clip_score_callback.CLIPScoreCallback
      init_args: {clip_model: data/models/tiny-clip, sd_path: data/models/tiny-decoder, num_images: 6,
                  every_n_epochs: 1}"""
"""The CLIP-score callback (with its image grid) as a YAML list item of trainer.callbacks: 6 images through the
tiny decoder, every epoch (a stage config's own CLIP-score callback at the same list position would lend it its
settings otherwise: jsonargparse merges the init_args of same-class items)."""


def val_images(path: Path, start: int, count: int) -> str:
    """Images `start` to `start + count - 1` of the default val shard, as a shard of their own (a small val set)."""
    with TarWriter(str(path), mtime=0) as writer:
        for number, raw in enumerate(iter_tar_samples(str(REPO / "data" / "synthetic" / "shards" / "val-000000.tar"))):
            if number >= start + count:
                break
            if number >= start:
                writer.write({key: value for key, value in raw.items() if key == "__key__" or not key.startswith("__")})
    return str(path)


def mllm_overlay(tokenizer: str, tokens: Path, num_codes: int, val_batch_size: int) -> str:
    """A YAML layered on conf/mllm/tiny.yaml: this tokenizer and its token shards, the generation callbacks kept
    but small (a short caption, 6 generated images), no progress bar."""
    return f"""
trainer:
  enable_progress_bar: false
  callbacks:
    - class_path: seed_lightning.mllm.captions_callback.CaptionMetricsCallback
      init_args: {{max_new_tokens: 10}}
    - class_path: seed_lightning.mllm.vqa_callback.VQAAccuracyCallback
      init_args:
        questions: data/synthetic/vqa/questions_val.json
        annotations: data/synthetic/vqa/annotations_val.json
        train_annotations: data/synthetic/vqa/annotations_train.json
        max_new_tokens: 5
{CLIP_SCORE_CALLBACK}
model:
  tokenizer: {tokenizer}
  model: {{num_visual_codes: {num_codes}}}
  export_dir: null
data:
  train: [{{urls: {tokens}/train-*.tar}}]
  val: {tokens}/val-*.tar
  val_batch_size: {val_batch_size}
  num_workers: 0
"""


DASHBOARD_SECTIONS = ("train", "val", "throughput", "data")
"""The scalar sections a run's TensorBoard may have (`data` only when samples were skipped)."""


def assert_dashboard(log_dir: Path, hyperparameter: tuple[str, float], metric: str) -> None:
    """The run's TensorBoard has no placeholder hp_metric nor an `epoch` section, and its HPARAMS row holds the
    config with the final metrics."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "hp_metric" not in tags and "epoch" not in tags and "train/epoch" in tags
    assert any(tag == "train/lr" or tag.startswith("train/lr/") for tag in tags), tags  # one chart per param group
    assert all(tag.split("/")[0] in DASHBOARD_SECTIONS for tag in tags), tags
    plugin = {tag: HParamsPluginData.FromString(content) for tag, content in events.PluginTagToContent("hparams").items()}
    name, value = hyperparameter
    assert plugin["_hparams_/session_start_info"].session_start_info.hparams[name].number_value == pytest.approx(value)
    assert metric in [info.name.tag for info in plugin["_hparams_/experiment"].experiment.metric_infos]
