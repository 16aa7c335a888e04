"""CaptionMetricsCallback: captions gathered across ranks without duplicates, scores equal pycocoevalcap's."""

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from lightning.pytorch.loggers import TensorBoardLogger

from seed_lightning.core import validation as validation_callbacks
from seed_lightning.core.errors import ConfigError
from seed_lightning.mllm import captions_callback
from seed_lightning.mllm import captions as caption_metrics
from seed_lightning.mllm.captions import score_captions
from seed_lightning.mllm.captions_callback import CaptionMetricsCallback

# code of an image -> (what the fake MLLM says, the image's references)
IMAGES = {
    0: ("a red circle at the top", ["a red circle at the top", "one red circle on a white background"]),
    1: ("two blue squares", ["two blue squares in the middle", "blue squares on a black background"]),
    2: ("a green star on a gray background", ["a large green star on a gray background", "a green star"]),
    3: ("a yellow cross", ["a small purple triangle at the bottom", "a purple triangle"]),
    4: ("an orange circle in the middle", ["an orange circle in the middle", "a large orange circle"]),
}


class FakeMLLM:
    def __init__(self):
        self.calls = []

    def caption(self, codes, max_new_tokens=30, num_beams=1):
        self.calls.append((codes.shape[0], max_new_tokens, num_beams))
        return [IMAGES[int(code)][0] for code in codes[:, 0]]


class CaptioningModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.mllm = FakeMLLM()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def validation_step(self, batch, batch_idx):
        return None


def make_batch(indices: list[int]) -> dict:
    """Val batch of the token shards: image i has codes filled with i and image_id 100 + i."""
    return {
        "codes": torch.tensor([[i] * 32 for i in indices]),
        "caption": [IMAGES[i][1][0] for i in indices],
        "key": [f"{i:06d}" for i in indices],
        "meta": [{"image_id": 100 + i, "captions": IMAGES[i][1]} for i in indices],
        "index": torch.tensor(indices),
    }


def loader(*batches: dict) -> DataLoader:
    return DataLoader(list(batches), batch_size=None)


def make_trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run", version=""), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **kwargs,
    )


def test_two_ranks_merge_without_duplicates_and_score_like_pycocoevalcap(tmp_path, monkeypatch):
    # This process is rank 0 with images 0-2; "rank 1" had 3, 4 and, as DistributedSampler padding,
    # index 0 again (with a different caption that must not count).
    rank1 = {
        3: {"image_id": 103, "caption": IMAGES[3][0], "references": IMAGES[3][1]},
        4: {"image_id": 104, "caption": IMAGES[4][0], "references": IMAGES[4][1]},
        0: {"image_id": 100, "caption": "padding duplicate", "references": IMAGES[0][1]},
    }
    monkeypatch.setattr(validation_callbacks, "gather_objects", lambda local: [local, rank1])
    module = CaptioningModule()
    callback = CaptionMetricsCallback(num_beams=2, max_new_tokens=7)
    trainer = make_trainer(tmp_path, callbacks=[callback])
    results = trainer.validate(module, dataloaders=loader(make_batch([0, 1]), make_batch([2])), verbose=False)[0]

    predictions = {100 + i: IMAGES[i][0] for i in range(5)}
    references = {100 + i: IMAGES[i][1] for i in range(5)}
    expected = score_captions(predictions, references, meteor=False)
    assert 0 < expected["CIDEr"] and 0 < expected["Bleu_4"] < 1  # a test that can tell scores apart
    assert results["val/CIDEr"] == pytest.approx(expected["CIDEr"], abs=1e-6)
    assert results["val/BLEU_4"] == pytest.approx(expected["Bleu_4"], abs=1e-6)
    assert results["val/BLEU_1"] == pytest.approx(expected["Bleu_1"], abs=1e-6)
    assert results["val/ROUGE_L"] == pytest.approx(expected["ROUGE_L"], abs=1e-6)
    assert "val/METEOR" not in results
    assert module.mllm.calls == [(2, 7, 2), (1, 7, 2)]

    written = json.loads((tmp_path / "run" / "captions_epoch0.json").read_text())
    assert written == [{"image_id": 100 + i, "caption": IMAGES[i][0]} for i in range(5)]


def test_max_images_limits_captioning_by_val_index(tmp_path):
    module = CaptioningModule()
    trainer = make_trainer(tmp_path, callbacks=[CaptionMetricsCallback(max_images=2)])
    trainer.validate(module, dataloaders=loader(make_batch([0, 1]), make_batch([2, 3])), verbose=False)
    assert [n for n, _, _ in module.mllm.calls] == [2]
    written = json.loads((tmp_path / "run" / "captions_epoch0.json").read_text())
    assert [row["image_id"] for row in written] == [100, 101]


def test_missing_java_fails_before_any_captioning(tmp_path, monkeypatch):
    monkeypatch.setattr(caption_metrics, "_java_problem", lambda: "`java` is not on PATH")
    module = CaptioningModule()
    trainer = make_trainer(tmp_path, callbacks=[CaptionMetricsCallback()])
    with pytest.raises(ConfigError, match="need Java.*apt-get install.*`score: false`"):
        trainer.validate(module, dataloaders=loader(make_batch([0])), verbose=False)
    assert module.mllm.calls == []


def test_without_scoring_captions_are_generated_written_and_shown_without_java(tmp_path, monkeypatch):
    monkeypatch.setattr(caption_metrics, "_java_problem", lambda: "`java` is not on PATH")
    shown = []
    monkeypatch.setattr(captions_callback, "add_to_tensorboard", lambda trainer, *args: shown.append(args))
    module = CaptioningModule()
    trainer = make_trainer(tmp_path, callbacks=[CaptionMetricsCallback(score=False)])
    results = trainer.validate(module, dataloaders=loader(make_batch([0, 1]), make_batch([2])), verbose=False)[0]
    assert not [name for name in results if name.startswith("val/")]
    written = json.loads((tmp_path / "run" / "captions_epoch0.json").read_text())
    assert written == [{"image_id": 100 + i, "caption": IMAGES[i][0]} for i in range(3)]
    ((kind, tag, table),) = shown
    assert (kind, tag) == ("text", "val/captions") and IMAGES[2][0] in table


def test_module_without_mllm_is_a_config_error(tmp_path):
    class NoMLLM(L.LightningModule):
        def validation_step(self, batch, batch_idx):
            return None

    trainer = make_trainer(tmp_path, callbacks=[CaptionMetricsCallback()])
    with pytest.raises(ConfigError, match=r"\.mllm"):
        trainer.validate(NoMLLM(), dataloaders=loader(make_batch([0])), verbose=False)
