import io
import json
from collections import Counter

from PIL import Image

from bench.rehearsal import data
from seed_lightning.core.data.shards import expand_urls, iter_tar_samples
from seed_lightning.mllm.vqa import read_vqa


def test_generated_data_sits_where_the_paper_configs_read_it(tmp_path):
    data.generate(tmp_path, num_train=12, num_val=10)
    train = expand_urls(str(tmp_path / data.train_shard_pattern(12)))
    samples = [s for url in train for s in iter_tar_samples(url, Counter())]
    assert len(samples) == 12 and all(len(s["__key__"]) == 9 for s in samples)  # img2dataset keys
    sizes = set()
    for sample in samples:
        extension = "jpg" if "jpg" in sample else "png"
        image = Image.open(io.BytesIO(sample[extension]))
        meta = json.loads(sample["json"])
        assert (meta["width"], meta["height"]) == image.size and meta["status"] == "success"
        assert sample["txt"].decode() == meta["caption"]
        sizes.add((image.size, image.mode, extension))
    assert ((1024, 768), "RGB", "jpg") in sizes and ((640, 427), "L", "jpg") in sizes
    assert ((500, 333), "RGBA", "png") in sizes and ((480, 640), "P", "png") in sizes

    val = expand_urls(str(tmp_path / data.val_shard_pattern()))  # the config's karpathy-val-{000000..000004}
    val_samples = [s for url in val for s in iter_tar_samples(url, Counter())]
    assert len(val) == data.VAL_SHARDS and len(val_samples) == 10
    image_ids = {json.loads(s["json"])["image_id"] for s in val_samples}
    assert all(len(json.loads(s["json"])["captions"]) == 5 for s in val_samples)
    questions = read_vqa(tmp_path / data.VQA_QUESTIONS, tmp_path / data.VQA_ANNOTATIONS)
    assert questions and {q.image_id for q in questions} == image_ids
    assert all(len(q.answers) == 10 for q in questions)
