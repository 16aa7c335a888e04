"""Stage 1 of the tiny config on 2 CPU processes (gloo) launched as 2 nodes x 1 process (two torchrun agents
with node ranks, on this host) and as 1 node x 2: the same losses step for step; a checkpoint of one layout
continues exactly under the other; a checkpoint of 2 processes is refused on 1, and a Trainer layout that is not
the one torchrun started is refused before any model loads, each with one line. The runs are bench/multinode.py's
(which the GPU bench runs on 2 GPUs)."""

import pytest

from bench import multinode
from tests.cli_runs import CLI, run_in_own_group

STEPS, SAVE_AT = 4, 2  # 3 steps an epoch on 2 processes: the resume lands mid-epoch and crosses an epoch end


@pytest.mark.slow
def test_two_nodes_and_two_processes_train_alike_and_resume_each_other(default_world, tmp_path):
    losses = multinode.compare_layouts(tmp_path, "cpu", STEPS, SAVE_AT, timeout=300)
    print()
    assert multinode.report(losses, STEPS, SAVE_AT)
    assert losses["1x2"][STEPS - 1] != losses["1x2"][0], "the losses move: the comparison is not of constants"

    # 2 processes -> 1: refused, saying what changed and what to do (after the model loads: the data state says it).
    single = tmp_path / "single"
    single.mkdir()
    (single / "overlay.yaml").write_text(multinode.overlay(single, STEPS, SAVE_AT, multinode.SHARD))
    checkpoint = tmp_path / "1x2" / "checkpoints" / f"step={SAVE_AT}.ckpt"
    command = [*CLI, "tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", "-c", str(single / "overlay.yaml"),
               "--ckpt_path", str(checkpoint)]
    assert run_in_own_group(command, single / "log.txt", timeout=300, env={"OMP_NUM_THREADS": "1"}) == 2
    errors = [line for line in (single / "log.txt").read_text().splitlines() if "error" in line.lower()]
    assert errors == [f"seed-lightning: error: {checkpoint} was written by 2 processes and this run has 1"
                      " (trainer.num_nodes x trainer.devices): its data stream positions (one per process) and global"
                      " batch (2 x 16) only continue on 2; resume with num_nodes x devices = 2 (any split over nodes),"
                      " or start a new run in another output folder"]

    # torchrun starts 1 node x 2 processes, the Trainer is told 2 nodes x 1: refused by every process, at start.
    mismatch = tmp_path / "mismatch"
    statuses = multinode.fit("1x2", mismatch, "cpu", STEPS, SAVE_AT, timeout=300,
                             extra=("--trainer.num_nodes", "2", "--trainer.devices", "1"))
    assert statuses != [0]
    log = (mismatch / "node0.log").read_text()
    line = ("seed-lightning: error: torchrun started 1 node(s) x 2 process(es) per node but the Trainer is set to"
            " num_nodes=2 x devices=1; set --trainer.num_nodes 1 --trainer.devices 2, or launch torchrun with"
            " --nnodes 2 --nproc-per-node 1")
    assert log.count(line) == 2 and "Traceback" not in log.split(line)[0]
    assert not list(mismatch.rglob("events.out.tfevents.*")), "stopped before training"
