"""bench/stage2.py end to end in its tiny CPU form, with L_gen (a tiny SD text encoder built by the bench)."""

import pytest


@pytest.mark.slow
def test_stage2_bench_with_lgen_caches_the_generation_targets_per_caption(run_bench, monkeypatch):
    from seed_lightning.tokenizer.sd_text_encoder import SDTextEncoder

    runs = []
    forward = SDTextEncoder.forward
    monkeypatch.setattr(SDTextEncoder, "forward", lambda self, captions: runs.append(len(captions)) or forward(self, captions))
    records = run_bench("stage2", "--gen", "--batch", "8", "--batches", "2", "--epochs", "2", "--workers", "1")
    baseline, cached, in_workers, recompute = records
    assert baseline["name"] == "THE baseline: plain HF bf16 frozen towers recomputed with L_gen B=8"
    assert cached["name"] == "project cached embeddings with L_gen B=8"
    assert in_workers["name"] == "project cached embeddings with L_gen, reads in 1 loader workers B=8"
    assert recompute["name"] == "project recompute frozen towers with L_gen B=8"
    for project in (cached, in_workers, recompute):
        assert len(project["epoch_seconds"]) == 2 and project["images_per_epoch"] == 16
        assert project["ratio_to_baseline"] == pytest.approx(baseline["epoch_seconds"] / min(project["epoch_seconds"][1:]))
    # The project's SD text encoder ran on each batch of the cached runs' first epoch only (each batch has captions of
    # its own; with workers too: they only read the caches), and on every batch of the recomputing run; THE baseline
    # runs its own plain one.
    assert runs == [8] * (2 + 2 + 2 * 2)
