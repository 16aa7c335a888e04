"""The evaluation callbacks under DDP: `seed-lightning ... evaluate` on 2 CPU processes (gloo) reports the same
numbers and writes the same files as on 1 process, with every callback: caption metrics, VQA accuracy, CLIP
score and its image grid (MLLM), retrieval and reconstruction CLIP similarity with its grid (tokenizer).

The ranks split the val set (batch b on rank b % 2; the generated images come from both ranks): any
rank-0-only collective, lost or doubled prediction, or average over ranks instead of samples shows. The models
are random (built here in seconds); their predictions still have to agree.
"""

import lightning as L
import pytest
import torch

from seed_lightning.mllm import extract
from seed_lightning.mllm.model import MultimodalLMConfig
from seed_lightning.mllm.module import MLLMModule
from seed_lightning.tokenizer.model import SeedTokenizer
from seed_lightning.tokenizer.codebook import CodebookModule
from tests.cli_runs import CLIP_SCORE_CALLBACK, REPO, assert_same_evaluation, evaluate, mllm_overlay, val_images
from tests.mllm.test_extract import save_tokenizer

pytestmark = pytest.mark.slow

NUM_VAL_IMAGES = 25  # odd: the ranks hold 13 and 12
NUM_CODES = 256
MODELS = REPO / "data" / "models"


def save_module_checkpoint(module: L.LightningModule, path) -> str:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        max_epochs=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(default_world, tmp_path_factory):
    """Random tokenizer (+ its codebook-stage checkpoint), the val images' tokens and a random MLLM checkpoint."""
    directory = tmp_path_factory.mktemp("ddp-validation")
    tokenizer = save_tokenizer(directory / "tokenizer", num_codes=NUM_CODES)
    images = val_images(directory / "val-images.tar", 0, NUM_VAL_IMAGES)
    extract.extract_split(tokenizer, images, directory / "tokens", "val", device="cpu", progress=False)
    torch.manual_seed(0)
    mllm = MLLMModule(model=MultimodalLMConfig(pretrained=str(MODELS / "tiny-opt"), num_visual_codes=NUM_CODES,
                                               lora=None), tokenizer=tokenizer)
    codebook = CodebookModule(model=SeedTokenizer.load(tokenizer).config, init_from=tokenizer,
                              text_tokenizer=str(MODELS / "bert-tokenizer"), generation_target=str(MODELS / "tiny-sd"))
    (directory / "mllm.yaml").write_text(mllm_overlay(tokenizer, directory / "tokens", NUM_CODES, val_batch_size=4))
    (directory / "codebook.yaml").write_text(f"""
trainer:
  enable_progress_bar: false
  callbacks:
{CLIP_SCORE_CALLBACK}
model:
  init_from: {tokenizer}
data:
  val: {images}
  val_batch_size: 4
  num_workers: 0
""")
    return {
        "mllm": (save_module_checkpoint(mllm, directory / "mllm.ckpt"),
                 ["conf/mllm/tiny.yaml", directory / "mllm.yaml"]),
        "tokenizer": (save_module_checkpoint(codebook, directory / "codebook.ckpt"),
                      ["conf/tokenizer/tiny.yaml", "conf/tokenizer/tiny-codebook.yaml", directory / "codebook.yaml"]),
    }


@pytest.mark.parametrize(("kind", "losses", "callback_metrics"), [
    ("mllm", ["val/loss", "val/caption_loss", "val/image_loss"],
     ["val/CIDEr", "val/BLEU_4", "val/vqa_acc", "val/vqa_questions", "val/clip_score"]),
    ("tokenizer", ["val/loss", "val/vq", "val/recon", "val/gen"],
     ["val/i2t_R@1", "val/t2i_R@5", "val/codebook_perplexity", "val/recon_clip_similarity", "val/recon_clip_score"]),
])
def test_two_processes_evaluate_like_one(checkpoints, tmp_path, kind, losses, callback_metrics):
    ckpt, configs = checkpoints[kind]
    # One torch thread per process in both runs: Stable Diffusion's CPU kernels (GroupNorm, convolutions) split their
    # sums by thread, so its pixels, hence the CLIP numbers, change with the thread count (Lightning gives each of N
    # processes 1/N of the cores). The LM's numbers do not (tests/e2e/test_ddp_pipeline.py compares them as run).
    one = evaluate(kind, ckpt, configs, tmp_path / "one", devices=1, threads=1)
    evaluate(kind, ckpt, configs, tmp_path / "two", devices=2, threads=1)
    assert set(callback_metrics) <= set(one) and set(losses) <= set(one)
    assert_same_evaluation(tmp_path / "one", tmp_path / "two", losses)
    assert list((tmp_path / "two").rglob("clip_grid_epoch0.png")), "the grid is written under DDP too"
    if kind == "mllm":
        assert one["val/vqa_questions"] > NUM_VAL_IMAGES  # every question of every image, each once
