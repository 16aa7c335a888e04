"""gather_objects + merge_by_index, single-process and in a real 2-process gloo group."""

import pickle
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from seed_lightning.core.distributed import gather_objects, merge_by_index


def test_gather_without_process_group_is_a_singleton():
    assert not dist.is_initialized()
    payload = {3: "x"}
    assert gather_objects(payload) == [payload]


def test_merge_drops_duplicates_keeping_the_lowest_rank_and_sorts():
    rank0 = {0: "a0", 2: "c0", 4: "e0"}
    rank1 = {1: "b1", 3: "d1", 0: "a1"}  # index 0 repeated: sampler padding
    assert merge_by_index([rank0, rank1]) == {0: "a0", 1: "b1", 2: "c0", 3: "d1", 4: "e0"}
    assert list(merge_by_index([rank0, rank1])) == [0, 1, 2, 3, 4]
    assert merge_by_index([rank1, rank0])[0] == "a1"  # rank order, not value, decides
    assert merge_by_index([]) == {}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gather_worker(rank: int, world_size: int, port: int, out_dir) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        # DistributedSampler-style split of 5 samples over 2 ranks: padded to 6, so index 0 repeats.
        padded = list(range(5)) + [0]
        indices = padded[rank::world_size]
        gathered = gather_objects({index: f"pred-{index}-rank{rank}" for index in indices})
        (out_dir / f"rank{rank}.pkl").write_bytes(pickle.dumps(merge_by_index(gathered)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # each spawned process imports torch: ~10 s on 2 shared cores
def test_gather_and_merge_across_two_gloo_processes(tmp_path):
    world_size = 2
    mp.spawn(_gather_worker, args=(world_size, _free_port(), tmp_path), nprocs=world_size, join=True)
    merged = [pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes()) for rank in range(world_size)]
    expected = {0: "pred-0-rank0", 1: "pred-1-rank1", 2: "pred-2-rank0", 3: "pred-3-rank1", 4: "pred-4-rank0"}
    # Every rank sees the same merged result: all five samples, each once.
    assert merged[0] == merged[1] == expected
