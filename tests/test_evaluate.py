"""`seed-lightning ... evaluate`: config + checkpoint -> validate with the configured callbacks -> table + JSON."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from seed_lightning.cli import main
from seed_lightning.core.errors import ConfigError
from seed_lightning.evaluate import format_table
from seed_lightning.lightning_cli import SeedCLI

CAPTIONS = ["a red circle at the top", "two blue squares in the middle", "a green star on a gray background"]


class CaptionLookup:
    """The stand-in MLLM: captions image i with CAPTIONS[i] (codes are filled with i)."""

    def caption(self, codes, max_new_tokens=30, num_beams=1):
        return [CAPTIONS[int(code)] for code in codes[:, 0]]


class MLLMStandIn(L.LightningModule):
    """Exposes .mllm/.seed_tokenizer as MLLMModule does; `offset` is a weight that the checkpoint sets."""

    def __init__(self, start: float = 0.0):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor(start))
        self.mllm = CaptionLookup()
        self.seed_tokenizer = None

    def validation_step(self, batch, batch_idx):
        self.log("val/offset", self.offset, batch_size=len(batch["index"]))


class CodesDataModule(L.LightningDataModule):
    """Val batches shaped like ShardDataModule(kind="codes") ones."""

    def __init__(self, num_images: int = 3):
        super().__init__()
        self.num_images = num_images

    def val_dataloader(self):
        indices = list(range(self.num_images))
        batch = {
            "codes": torch.tensor([[i] * 32 for i in indices]),
            "caption": [CAPTIONS[i] for i in indices],
            "key": [str(i) for i in indices],
            "meta": [{"image_id": i, "captions": [CAPTIONS[i], CAPTIONS[i] + " again"]} for i in indices],
            "index": torch.tensor(indices),
        }
        return DataLoader([batch], batch_size=None)


def evaluate(model_class: type, configs: list[str], ckpt: str, *options: str) -> dict[str, float]:
    """`evaluate -c CONFIG... --ckpt_path CKPT OPTIONS` of a SeedCLI over `model_class` and CodesDataModule; the
    metrics it wrote (to --out, default results.json beside the checkpoint)."""
    args = ["evaluate", *(f"--config={config}" for config in configs), "--ckpt_path", ckpt, *options]
    SeedCLI(model_class, CodesDataModule, args=args)
    out = options[options.index("--out") + 1] if "--out" in options else f"{ckpt.rpartition('/')[0]}/results.json"
    return json.loads(open(out).read())["metrics"]


@pytest.fixture
def run(tmp_path):
    module = MLLMStandIn(start=2.5)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        max_epochs=0)
    trainer.strategy.connect(module)
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    config = tmp_path / "eval.yaml"
    config.write_text(f"""
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path / "eval"}
  callbacks:
    - class_path: seed_lightning.mllm.captions_callback.CaptionMetricsCallback
      init_args:
        max_new_tokens: 5
data:
  num_images: 3
""")
    return checkpoint, config


def test_validates_the_checkpoint_with_configured_callbacks(run, tmp_path, capsys):
    checkpoint, config = run
    metrics = evaluate(MLLMStandIn, [str(config)], str(checkpoint))
    assert metrics["val/offset"] == pytest.approx(2.5), "weights come from the checkpoint, not from __init__"
    assert metrics["val/BLEU_1"] == pytest.approx(1.0) and metrics["val/CIDEr"] > 0  # exact prediction of a reference
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["metrics"] == metrics and written["checkpoint"] == str(checkpoint)
    printed = capsys.readouterr().out
    assert "val/CIDEr" in printed and "val/offset" in printed
    assert json.loads((tmp_path / "eval" / "captions_epoch0.json").read_text())[0] == {
        "image_id": 0, "caption": CAPTIONS[0]}


def test_overrides_and_out_path(run, tmp_path):
    checkpoint, config = run
    out = tmp_path / "elsewhere" / "metrics.json"
    metrics = evaluate(MLLMStandIn, [str(config)], str(checkpoint), "--out", str(out), "--data.num_images", "2")
    assert metrics["val/BLEU_1"] == pytest.approx(1.0)
    assert len(json.loads((tmp_path / "eval" / "captions_epoch0.json").read_text())) == 2


def test_user_errors_are_one_line_config_errors_before_the_model_is_built(run, tmp_path):
    checkpoint, config = run
    built = []

    class CountedStandIn(MLLMStandIn):
        def __init__(self, start: float = 0.0):
            built.append(start)
            super().__init__(start)

    def error(configs, *options) -> str:
        with pytest.raises(ConfigError) as raised:
            SeedCLI(CountedStandIn, CodesDataModule, args=["evaluate", *(f"--config={c}" for c in configs), *options])
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert "missing.ckpt: the file does not exist" in error([config], "--ckpt_path", str(tmp_path / "missing.ckpt"))
    assert "missing.yaml" in error([tmp_path / "missing.yaml"], "--ckpt_path", str(checkpoint))
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text() + "  no_such_key: 1\n")
    assert "no_such_key" in error([bad], "--ckpt_path", str(checkpoint))
    assert "evaluate needs --ckpt_path" in error([config])
    assert built == []


def test_without_java_the_evaluation_stops_before_the_model_is_built_unless_scoring_is_off(run, tmp_path, no_java):
    checkpoint, config = run
    built = []

    class CountedStandIn(MLLMStandIn):
        def __init__(self, start: float = 0.0):
            built.append(start)
            super().__init__(start)

    with pytest.raises(ConfigError, match="need Java.*`score: false`"):
        evaluate(CountedStandIn, [str(config)], str(checkpoint))
    assert built == []
    no_scores = tmp_path / "no-scores.yaml"
    no_scores.write_text(config.read_text().replace("max_new_tokens: 5", "max_new_tokens: 5\n        score: false"))
    metrics = evaluate(CountedStandIn, [str(no_scores)], str(checkpoint))
    assert "val/CIDEr" not in metrics and metrics["val/offset"] == pytest.approx(2.5)
    assert json.loads((tmp_path / "eval" / "captions_epoch0.json").read_text())[0]["caption"] == CAPTIONS[0]


def test_the_command_reports_errors_in_one_line(tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "conf" / "tokenizer" / "tiny.yaml"
    assert main(["tokenizer", "evaluate", "-c", str(config), "--ckpt_path", str(tmp_path / "missing.ckpt")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"seed-lightning: error: cannot load checkpoint {tmp_path / 'missing.ckpt'}: the file does not exist; "
        "pass another --ckpt_path (e.g. its .prev.ckpt twin or 'last')")


def test_format_table_aligns_columns():
    table = format_table({"val/CIDEr": 1.23456, "val/vqa_acc": 50.0}).splitlines()
    assert table[0].split() == ["metric", "value"]
    assert table[2].split() == ["val/CIDEr", "1.2346"] and table[3].split() == ["val/vqa_acc", "50.0000"]
    assert len({line.index(line.split()[1]) for line in table[2:]}) == 1
