"""FrozenOutputs: the cached frozen-tower outputs attached to training batches, in the DataLoader workers or the
main process; under DDP (2 CPU processes, gloo) every rank's workers read what its main process reads.

The DDP training runs in a subprocess of this file (`python test_frozen_outputs.py ARGS_JSON`)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from seed_lightning.tokenizer import frozen_outputs
from seed_lightning.tokenizer.embedding_cache import EmbeddingCache
from seed_lightning.tokenizer.frozen_outputs import (
    CAUSAL_EMBEDS,
    GENERATION_TARGETS,
    FrozenOutputs,
    caption_keys,
    image_keys,
)
from tests.cli_runs import REPO, free_ports, val_images


def batch_of(keys: list[str], captions: list[str]) -> dict:
    return {"key": keys, "url": ["shard.tar"] * len(keys), "caption": captions,
            "pixel_values": torch.zeros(len(keys), 3, 2, 2)}


def caches(tmp_path) -> FrozenOutputs:
    outputs = FrozenOutputs(EmbeddingCache(tmp_path / "e"), EmbeddingCache(tmp_path / "t"))
    cached = batch_of(["a", "b"], ["one", "two"])
    outputs.embeddings.put(image_keys(cached), torch.ones(2, 3, 4))
    outputs.targets.put(caption_keys(cached["caption"]), torch.full((2, 5, 4), 2.0))
    return outputs


def test_a_batch_gets_each_output_whose_rows_are_all_cached_and_loses_its_pixels_with_the_embeddings(tmp_path):
    outputs = caches(tmp_path)
    whole = outputs.attach(batch_of(["b", "a"], ["two", "one"]))
    assert "pixel_values" not in whole and not outputs.lacks(whole)
    assert whole[CAUSAL_EMBEDS].shape == (2, 3, 4) and whole[GENERATION_TARGETS].sum() == 2 * 5 * 4 * 2
    part = outputs.attach(batch_of(["a", "new"], ["one", "two"]))  # an image not cached: computed, from its pixels
    assert "pixel_values" in part and CAUSAL_EMBEDS not in part and GENERATION_TARGETS in part and outputs.lacks(part)
    without_lgen = FrozenOutputs(outputs.embeddings, None).attach(batch_of(["a"], ["never seen"]))
    assert sorted(without_lgen) == ["caption", CAUSAL_EMBEDS, "key", "url"]


def test_a_worker_indexes_the_chunks_written_since_it_started_when_a_batch_is_not_all_cached(tmp_path, monkeypatch):
    worker = FrozenOutputs(EmbeddingCache(tmp_path / "e"), None)  # started before the owner flushed
    owner = FrozenOutputs(EmbeddingCache(tmp_path / "e"), None)
    owner.embeddings.put(["shard.tar#a"], torch.ones(1, 3, 4))
    owner.embeddings.flush()
    batch = batch_of(["a"], ["one"])
    assert "pixel_values" in worker(batch, 0, 0), "the main process reads its own caches: nothing written elsewhere"
    monkeypatch.setattr(frozen_outputs, "get_worker_info", lambda: object())
    assert CAUSAL_EMBEDS in worker(batch, 0, 0)


def fit_on_two_ranks(shard: str, root: str) -> None:
    """Stage 2 with L_gen, 2 epochs of 2 batches per rank from 1 DataLoader worker each, on a 4-image shard read in
    order (every batch holds all 4, each rank its own random crops). Each rank writes one record per batch: whether
    it came with pixels and, when it came with the cached outputs, whether they are what the main process reads."""
    import lightning as L

    from seed_lightning.core.data.datamodule import ShardDataModule, ShardSource
    from seed_lightning.tokenizer.codebook import CodebookModule
    from tests.tokenizer.test_module import make_module, trainer

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = make_module(SimpleNamespace(models=REPO / "data" / "models"), CodebookModule, cache_dir=f"{root}/cache")
    transfer = module.transfer_batch_to_device

    def recording_transfer(batch, *args):
        record = {"epoch": module.current_epoch, "pixels": "pixel_values" in batch}
        if CAUSAL_EMBEDS in batch:
            read = module.frozen_outputs.attach({**batch, "pixel_values": None})
            record["as_read"] = [torch.equal(batch[name], read[name]) for name in (CAUSAL_EMBEDS, GENERATION_TARGETS)]
            record["sums"] = dict(zip(batch["key"], batch[CAUSAL_EMBEDS].float().sum(dim=(1, 2)).tolist()))
        with open(f"{root}/rank{module.global_rank}.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        return transfer(batch, *args)

    module.transfer_batch_to_device = recording_transfer
    data = ShardDataModule(train=[ShardSource(urls=shard)], image_size=64, batch_size=4, num_workers=1,
                           samples_per_epoch=16, shuffle_buffer=0)
    fit = trainer(root, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, devices=2, strategy="ddp")
    fit.fit(module, datamodule=data)


@pytest.mark.slow
def test_under_ddp_the_workers_of_every_rank_attach_what_its_main_process_reads(tmp_path):
    shard = val_images(tmp_path / "four.tar", start=0, count=4)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(free_ports(1)[0])}
    run = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps([shard, str(tmp_path)])],
                         env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [[json.loads(line) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
             for rank in range(2)]
    for records in ranks:
        assert [(r["epoch"], r["pixels"]) for r in records] == [(0, True), (0, True), (1, False), (1, False)]
        assert all(r["as_read"] == [True, True] for r in records[2:])
    # Both ranks cached all 4 images (their own crops); both read the same rows: those of the chunk sorting first.
    assert ranks[0][2]["sums"] == ranks[1][2]["sums"] == ranks[1][3]["sums"]


if __name__ == "__main__":
    fit_on_two_ranks(*json.loads(sys.argv[1]))
