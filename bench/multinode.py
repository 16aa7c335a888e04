"""Stage 1 in two launch layouts of the same world size, on this one host: 2 nodes x 1 process (two torchrun
agents, node ranks 0 and 1, meeting at 127.0.0.1) and 1 node x 2 processes. Prints their per-step train losses
side by side and whether they are equal, then resumes a mid-run checkpoint of the 1 x 2 run as 2 x 1 and checks
that it continues with exactly the losses of the uninterrupted run.

    bash bench/multinode.sh                         # 2 GPUs: one per "node" (CUDA_VISIBLE_DEVICES), NCCL
    python -m bench.multinode --accelerator cpu     # 2 CPU processes, gloo

The tiny tokenizer config (conf/tokenizer/tiny.yaml, fp32, deterministic) on one shard of the synthetic data
(`make data`), a few steps: what is measured is the launch, not speed. The e2e test tests/e2e/test_multinode.py
runs the same on CPU. Exit status 0 when every comparison holds.
"""

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, like the other benches

from bench.rehearsal.measure import scalar_events  # noqa: E402
from tests.cli_runs import CLI, free_ports, run_together, torchrun  # noqa: E402

LAYOUTS = {"2x1": (2, 1), "1x2": (1, 2)}
"""Layout name -> (nodes, processes per node)."""
SHARD = "data/synthetic/shards/train-000000.tar"


def overlay(run_dir: Path, steps: int, save_at: int, shard: str) -> str:
    """Layered on conf/tokenizer/tiny.yaml: `steps` steps of 16 images per process, an epoch every 3 steps on 2
    processes (so a resume at `save_at` lands mid-epoch), every loss logged, a checkpoint `step=<save_at>.ckpt`,
    no validation."""
    return f"""
trainer:
  max_steps: {steps}
  max_epochs: -1
  log_every_n_steps: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  deterministic: warn  # deterministic kernels where torch has them (CUDA), a warning where not
  default_root_dir: {run_dir}
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run_dir}/checkpoints, filename: "{{step}}", every_n_train_steps: {save_at},
                  save_top_k: -1}}
data:
  train: [{{urls: {shard}}}]
  val: null
  batch_size: 16
  samples_per_epoch: 96
  num_workers: 0
"""


def fit(layout: str, run_dir: Path, accelerator: str, steps: int, save_at: int, shard: str = SHARD,
        ckpt_path: Path | None = None, extra: tuple[str, ...] = (), timeout: float = 600) -> list[int | None]:
    """`seed-lightning tokenizer fit` launched in `layout` by torchrun (one agent per node, all on this host), each
    node's output in `run_dir/node<r>.log`. On GPUs node r sees only its own GPUs, as on separate hosts. CPU threads
    are fixed at 1 per process, so both layouts do the same arithmetic. Returns each node's exit status."""
    nodes, per_node = LAYOUTS[layout]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "overlay.yaml").write_text(overlay(run_dir, steps, save_at, shard))
    [port] = free_ports(1)
    fit_args = [*CLI[1:], "tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", "-c", str(run_dir / "overlay.yaml"),
                "--trainer.accelerator", accelerator, "--trainer.strategy", "ddp",
                "--trainer.num_nodes", str(nodes), "--trainer.devices", str(per_node), *extra]
    if ckpt_path is not None:
        fit_args += ["--ckpt_path", str(ckpt_path)]
    commands = [torchrun(nodes, per_node, port, node_rank) + fit_args for node_rank in range(nodes)]
    envs = [{"OMP_NUM_THREADS": "1"} for _ in range(nodes)]
    if accelerator == "gpu" and nodes > 1:
        for node_rank, env in enumerate(envs):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(node_rank * per_node + i) for i in range(per_node))
    logs = [run_dir / f"node{node_rank}.log" for node_rank in range(nodes)]
    return run_together(commands, logs, timeout, envs)


def train_losses(run_dir: Path) -> dict[int, float]:
    """The logged `train/loss` of every step (0-based), from every TensorBoard event file of the run (the logger
    writes into the run folder, trainer.default_root_dir)."""
    return {step: value for step, _, value in scalar_events(run_dir, "train/loss")}


def log_tail(run_dir: Path, chars: int = 3000) -> str:
    return "\n".join(f"== {log.name}\n{log.read_text()[-chars:]}" for log in sorted(run_dir.glob("node*.log")))


def compare_layouts(out: Path, accelerator: str, steps: int = 6, save_at: int = 3, shard: str = SHARD,
                    timeout: float = 600) -> dict[str, dict[int, float]]:
    """The losses of three runs: `1x2` and `2x1` from scratch, and `2x1 resumed` from the 1x2 run's checkpoint at
    step `save_at`. Raises RuntimeError with the logs' tails when a run fails."""
    runs = {"1x2": ("1x2", None), "2x1": ("2x1", None), "2x1 resumed": ("2x1", out / "1x2" / "checkpoints")}
    losses = {}
    for name, (layout, resume_from) in runs.items():
        run_dir = out / name.replace(" ", "-")
        ckpt_path = None if resume_from is None else resume_from / f"step={save_at}.ckpt"
        statuses = fit(layout, run_dir, accelerator, steps, save_at, shard, ckpt_path, timeout=timeout)
        if statuses != [0] * len(statuses):
            raise RuntimeError(f"{name} run: exit statuses {statuses}\n{log_tail(run_dir)}")
        losses[name] = train_losses(run_dir)
    return losses


def report(losses: dict[str, dict[int, float]], steps: int, save_at: int) -> bool:
    """Print the losses side by side and the verdicts; True when the layouts agree exactly and the resume continues
    exactly."""
    names = list(losses)
    print(f"{'step':>4}" + "".join(f"{name:>16}" for name in names))
    for step in range(steps):
        print(f"{step:>4}" + "".join(f"{losses[name].get(step, float('nan')):>16.8f}" for name in names))
    same = sorted(losses["1x2"]) == list(range(steps)) and losses["2x1"] == losses["1x2"]
    resumed = losses["2x1 resumed"]
    continued = sorted(resumed) == list(range(save_at, steps)) and all(
        resumed[step] == losses["1x2"][step] for step in resumed)
    gap = max(abs(losses["2x1"].get(step, float("inf")) - loss) for step, loss in losses["1x2"].items())
    print(f"2 nodes x 1 == 1 node x 2, every step: {same} (max |difference| {gap:.3g})")
    print(f"1x2 checkpoint at step {save_at} resumed as 2x1 continues with the uninterrupted losses: {continued}")
    return same and continued


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--out", type=Path, default=None, help="an empty folder for the runs (default: a new one)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-at", type=int, default=3, help="the step of the checkpoint that is resumed")
    parser.add_argument("--shard", default=SHARD, help="training shard(s), a pattern")
    parser.add_argument("--timeout", type=float, default=150, help="seconds each run may take (a hung rendezvous)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="multinode-"))
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty: the runs would mix with what is there; give another")
    print(f"runs in {out}", flush=True)
    losses = compare_layouts(out, args.accelerator, args.steps, args.save_at, args.shard, args.timeout)
    return 0 if report(losses, args.steps, args.save_at) else 1


if __name__ == "__main__":
    sys.exit(main())
