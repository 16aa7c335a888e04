import pickle

import torch

from seed_lightning.tokenizer import embedding_cache
from seed_lightning.tokenizer.embedding_cache import EmbeddingCache


def test_rows_round_trip_through_disk_and_across_ranks(tmp_path):
    torch.manual_seed(0)
    rows = torch.randn(5, 3, 4)
    rank0 = EmbeddingCache(tmp_path, rank=0, rows_per_chunk=2)
    rank0.put(["a", "b", "c"], rows[:3])
    rank1 = EmbeddingCache(tmp_path, rank=1, rows_per_chunk=100)
    rank1.put(["d", "e"], rows[3:])
    assert rank0.get(["a", "d"]) is None  # rank 1 has not flushed yet
    rank1.flush()
    rank0.flush()
    rank0.refresh()
    got = rank0.get(["e", "a", "c"])
    assert torch.allclose(got.float(), rows[[4, 0, 2]].half().float())
    assert len(EmbeddingCache(tmp_path)) == 5


def test_missing_key_returns_none_and_put_keeps_first_value(tmp_path):
    cache = EmbeddingCache(tmp_path)
    assert cache.get(["x"]) is None
    cache.put(["x"], torch.ones(1, 2))
    cache.put(["x"], torch.zeros(1, 2))
    assert cache.get(["x"]).sum() == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_a_key_cached_by_several_ranks_is_read_from_the_first_chunk_whatever_the_order_found(tmp_path):
    # Each rank caches its own random crop of an image that both saw: every reader must pick the same one.
    rank0, rank1 = EmbeddingCache(tmp_path, rank=0), EmbeddingCache(tmp_path, rank=1)
    rank0.put(["shared", "a"], torch.full((2, 3), 0.0))
    rank1.put(["shared", "b"], torch.full((2, 3), 1.0))
    rank1.flush()  # rank 1 indexes its own chunk first, then rank 0's
    rank0.flush()  # rank 0 finds both chunks at once
    rank1.refresh()
    fresh = EmbeddingCache(tmp_path)  # finds both at once
    for reader in (rank0, rank1, fresh):
        assert reader.get(["shared"]).sum() == 0, "chunk-r0-... sorts first"
        assert reader.get(["a", "b"]).sum() == 3


def test_a_pickled_cache_maps_the_flushed_chunks_itself(tmp_path):
    owner = EmbeddingCache(tmp_path, rows_per_chunk=100)
    owner.put(["flushed"], torch.ones(1, 256, 256))
    owner.flush()
    owner.put(["pending"], torch.ones(1, 256, 256))
    data = pickle.dumps(owner)
    assert len(data) < 1000, "the rows are not pickled (a DataLoader worker started by spawn or forkserver)"
    copy = pickle.loads(data)
    assert copy.get(["flushed"]).sum() == 256 * 256
    assert "pending" not in copy, "unflushed rows stay with their owner"


def test_rows_gathered_in_a_dataloader_worker_are_in_shared_memory(tmp_path, monkeypatch):
    # The batch then reaches the main process without another copy.
    cache = EmbeddingCache(tmp_path)
    cache.put(["x"], torch.ones(1, 2))
    cache.flush()
    assert not cache.get(["x"]).is_shared()
    monkeypatch.setattr(embedding_cache, "get_worker_info", lambda: object())
    rows = cache.get(["x"])
    assert rows.is_shared() and rows.dtype == torch.float16 and rows.tolist() == [[1.0, 1.0]]
