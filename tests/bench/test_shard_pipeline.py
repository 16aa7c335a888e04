import io
from collections import Counter

import pytest
from PIL import Image

from seed_lightning.core.data.shards import expand_urls, iter_tar_samples
from tests.conftest import REPO


@pytest.fixture
def shard_pipeline(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # the benches import their `common` as scripts do
    import shard_pipeline

    return shard_pipeline


def test_the_paper_loader_is_measured_on_generated_jpeg_shards(shard_pipeline, tmp_path):
    settings = shard_pipeline.paper_data_settings()
    assert settings["num_workers"] >= 1 and settings["image_size"] == 224 and "train" not in settings
    pattern, kib = shard_pipeline.write_shards(tmp_path, 120, 90, shards=2, per_shard=3)
    samples = [sample for url in expand_urls(pattern) for sample in iter_tar_samples(url, Counter())]
    assert len(samples) == 6 and len({sample["__key__"] for sample in samples}) == 6
    assert all(Image.open(io.BytesIO(sample["jpg"])).size == (120, 90) and sample["txt"] for sample in samples)
    assert kib > 1

    small = {**settings, "batch_size": 4, "samples_per_epoch": 64}
    rate, measured = shard_pipeline.pipeline_rate(small, pattern, workers=2, batches=3)
    assert measured == 4 and rate > 0  # whole rounds of 2 workers after the first
