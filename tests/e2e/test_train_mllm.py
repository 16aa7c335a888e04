"""The multimodal LM end to end: tokenize images once, train with `seed-lightning mllm fit`, then use it
through `seed-lightning caption / vqa / generate`; and those commands' one-line errors.

Uses the default data and tiny models that `make data` builds.
"""

import io
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seed_lightning import cli
from seed_lightning.core.data.shards import iter_tar_samples
from seed_lightning.mllm.model import MultimodalLM, MultimodalLMConfig
from tests.cli_runs import assert_dashboard
from tests.mllm.test_extract import save_tokenizer

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "synthetic"
MODELS = REPO / "data" / "models"
NUM_CODES = 256
RUN = Path("checkpoints/tiny/mllm")
"""Where conf/mllm/tiny.yaml logs, keeps its checkpoints and exports, relative to the working directory."""
EXPORT = RUN / "export"


def first_val_image(path: Path) -> str:
    raw = next(iter_tar_samples(str(DATA / "shards" / "val-000000.tar")))
    extension = "jpg" if "jpg" in raw else "png"
    Image.open(io.BytesIO(raw[extension])).save(path)
    return str(path)


def scalars(log_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


@pytest.mark.slow
def test_extract_train_export_and_use(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tokenizer = save_tokenizer(tmp_path / "tokenizer", num_codes=NUM_CODES)
    shard = str(DATA / "shards" / "val-000000.tar")
    for prefix in ("train", "val"):
        assert cli.main(["extract-tokens", "--tokenizer", tokenizer, "--shards", shard, "--out", "tokens",
                         "--prefix", prefix, "--no-progress", "--device", "cpu"]) == 0

    # The shipped tiny config, pointed at this test's tokens, shortened, without the generation callbacks.
    config = yaml.safe_load((REPO / "conf" / "mllm" / "tiny.yaml").read_text())
    config["trainer"]["max_epochs"] = 3
    config["trainer"]["enable_progress_bar"] = False
    generation = ("CaptionMetricsCallback", "VQAAccuracyCallback", "CLIPScoreCallback")
    config["trainer"]["callbacks+"] = [c for c in config["trainer"]["callbacks+"]
                                       if c["class_path"].rpartition(".")[2] not in generation]
    model = config["model"]
    model["tokenizer"] = tokenizer
    model["model"]["pretrained"] = str(MODELS / "tiny-opt")
    model["model"]["num_visual_codes"] = NUM_CODES
    model["vqa_train"]["questions"] = str(DATA / "vqa" / "questions_val.json")
    model["vqa_train"]["annotations"] = str(DATA / "vqa" / "annotations_val.json")
    config["data"].update(train=[{"urls": "tokens/train-*.tar"}], val="tokens/val-*.tar", batch_size=32,
                          val_batch_size=128, num_workers=0, samples_per_epoch=256)
    (tmp_path / "mllm.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["mllm", "fit", "-c", "mllm.yaml", "--ckpt_path", "last"]) == 0

    caption_losses = scalars(tmp_path / RUN, "val/caption_loss")
    assert len(caption_losses) == 3
    assert caption_losses[0] < math.log(len(MultimodalLM.load(EXPORT / "merged").tokenizer))
    assert caption_losses[-1] < caption_losses[0] - 0.2, caption_losses
    assert scalars(tmp_path / RUN, "throughput/tokens_per_sec")
    assert_dashboard(tmp_path / RUN, hyperparameter=("model.optim.lr", 2e-3), metric="val/caption_loss")
    saved = json.loads((EXPORT / "merged" / "seed_mllm.json").read_text())
    assert saved["weights"] == "full" and saved["config"]["num_visual_codes"] == NUM_CODES
    assert (tmp_path / RUN / "checkpoints" / "last.ckpt").is_file()

    image = first_val_image(tmp_path / "image.png")
    common = ["--mllm", str(EXPORT / "merged"), "--tokenizer", tokenizer, "--device", "cpu"]
    capsys.readouterr()
    assert cli.main(["caption", image, *common]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["vqa", image, "is there a star?", *common, "--num-beams", "2"]) == 0
    assert capsys.readouterr().out.count("\n") == 1, "one answer line (it may be empty this early in training)"
    assert cli.main(["generate", "a red circle", "-o", "out.png", *common, "--sd", str(MODELS / "tiny-decoder")]) == 0
    assert Image.open(tmp_path / "out.png").size[0] > 0


class RecordBatches(L.Callback):
    """What the MLLM trained on: per train batch its images and codes per image (from the rows the loader built),
    and the data module's skip counts."""

    shapes: list[tuple[int, ...]] = []
    skipped: dict[str, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = batch["rows"]
        RecordBatches.shapes.append((rows.num_samples, int(rows.is_image.sum()) // rows.num_samples))

    def on_train_end(self, trainer, pl_module):
        RecordBatches.skipped = dict(trainer.datamodule.skipped)


@pytest.mark.slow
def test_a_tokenizer_of_16_queries_extracts_and_trains_on_16_codes_per_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = save_tokenizer(tmp_path / "tokenizer", num_codes=NUM_CODES, num_queries=16)
    shard = str(DATA / "shards" / "val-000000.tar")
    assert cli.main(["extract-tokens", "--tokenizer", tokenizer, "--shards", shard, "--out", "tokens",
                     "--prefix", "train", "--no-progress", "--device", "cpu"]) == 0

    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False, "enable_progress_bar": False,
                    "callbacks": [{"class_path": f"{__name__}.RecordBatches"}]},
        "checkpoint": {"save_top_k": 0, "save_last": False},
        "model": {"tokenizer": tokenizer, "max_length": 64,
                  "model": {"pretrained": str(MODELS / "tiny-opt"), "num_visual_codes": NUM_CODES,
                            "tokens_per_image": 16, "lora": None}},
        "data": {"train": [{"urls": "tokens/train-*.tar"}], "kind": "codes", "batch_size": 4, "num_workers": 0,
                 "samples_per_epoch": 8},
    }
    (tmp_path / "mllm.yaml").write_text(yaml.safe_dump(config))
    RecordBatches.shapes, RecordBatches.skipped = [], None
    assert cli.main(["mllm", "fit", "-c", "mllm.yaml"]) == 0
    assert RecordBatches.shapes == [(4, 16), (4, 16)]
    assert RecordBatches.skipped == {}, "no sample skipped as bad codes"


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny LM (merged) and tokenizer with matching codebooks, saved like `make train-mllm` leaves them."""
    directory = tmp_path_factory.mktemp("models")
    tokenizer = save_tokenizer(directory / "tokenizer", num_codes=NUM_CODES)
    torch.manual_seed(0)
    lm = MultimodalLM(MultimodalLMConfig(pretrained=str(MODELS / "tiny-opt"), num_visual_codes=NUM_CODES, lora=None))
    lm.save_merged(directory / "mllm")
    return ["--mllm", str(directory / "mllm"), "--tokenizer", tokenizer, "--device", "cpu"]


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    image = first_val_image(tmp_path / "image.png")
    assert cli.main(["caption", image, "--mllm", str(tmp_path / "nope"), "--tokenizer", str(tmp_path)]) == 2
    assert "does not exist" in one_line_error(capsys)


def test_unreadable_image_is_a_one_line_error(saved_models, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert cli.main(["caption", str(tmp_path / "broken.jpg"), *saved_models]) == 2
    assert "cannot read image" in one_line_error(capsys)
    assert cli.main(["vqa", str(tmp_path / "missing.png"), "what color?", *saved_models]) == 2
    assert "cannot read image" in one_line_error(capsys)


def test_caption_and_vqa_print_one_line(saved_models, tmp_path, capsys):
    image = first_val_image(tmp_path / "image.png")
    assert cli.main(["caption", image, *saved_models, "--max-new-tokens", "5"]) == 0
    assert cli.main(["vqa", image, "how many?", *saved_models, "--num-beams", "1", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("argv, message", [
    (["vqa", "image.png", "  "], "question is empty"),
    (["generate", "", "-o", "out.png"], "caption is empty"),
    (["generate", "a cat", "-o", "no/such/folder/out.png"], "does not exist"),
])
def test_bad_prompts_are_one_line_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in one_line_error(capsys)
