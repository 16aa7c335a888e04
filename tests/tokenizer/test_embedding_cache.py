import torch

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
