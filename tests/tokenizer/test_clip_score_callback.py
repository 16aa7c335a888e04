"""CLIPScoreCallback: text-to-image CLIP score (MLLM) and reconstruction CLIP similarity (tokenizer), by hand."""

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from devkit import tiny_clip, tiny_models
from devkit.tiny_models import TINY
from seed_lightning.core.data.transforms import CLIP_MEAN, CLIP_STD
from seed_lightning.tokenizer.clip_score_callback import CLIPScoreCallback, denormalize

CAPTIONS = ["a red circle at the top", "two blue squares", "a green star on a gray background", "a yellow cross"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny SD and an (untrained) tiny CLIP + processor, built offline."""
    sd_dir, clip_dir = tmp_path_factory.mktemp("tiny-sd"), tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    tiny_models.build_tiny_sd(CAPTIONS, sd_dir)
    settings = tiny_clip.TinyCLIPSettings(image_size=32, patch_size=8, hidden_size=32, projection_dim=16)
    tokenizer = tiny_models.build_clip_tokenizer(CAPTIONS)
    tiny_clip.build_model(tokenizer, settings).save_pretrained(clip_dir)
    tiny_clip.build_processor(tokenizer, settings).save_pretrained(clip_dir)
    return sd_dir, clip_dir


class FakeSeedTokenizer(torch.nn.Module):
    """codes -> generation embeddings by a fixed table; pixels -> the code of their mean brightness."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(8, TINY.sd_max_length * TINY.sd_text_hidden_size)
        torch.nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(0))
        self.config = SimpleNamespace(image_mean=CLIP_MEAN, image_std=CLIP_STD)

    def encode(self, pixel_values):
        return (pixel_values.mean(dim=(1, 2, 3)).sigmoid() * 8).long().clamp(0, 7)[:, None].expand(-1, 32)

    def decode(self, codes):
        return self.table(codes[:, 0]).view(len(codes), TINY.sd_max_length, TINY.sd_text_hidden_size)


class FakeMLLM:
    def __init__(self):
        self.seeds = []

    def generate_image_codes(self, captions, temperature=1.0, top_k=None, seed=None):
        self.seeds.append(seed)
        return torch.tensor([[CAPTIONS.index(caption) * 2] * 32 for caption in captions])


class MLLMStandIn(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.mllm = FakeMLLM()
        self.seed_tokenizer = FakeSeedTokenizer()

    def validation_step(self, batch, batch_idx):
        return None


class TokenizerStandIn(L.LightningModule):
    def __init__(self, trains_codebook: bool):
        super().__init__()
        self.tokenizer = FakeSeedTokenizer()
        self.trains_codebook = trains_codebook  # as the stage modules declare it: CodebookModule True

    def validation_step(self, batch, batch_idx):
        return None


def uint8_images(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def image_batch(indices):
    pixels = uint8_images(4)[indices].float() / 255
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return {"pixel_values": (pixels - mean) / std, "caption": [CAPTIONS[i] for i in indices],
            "key": [str(i) for i in indices], "meta": [{"image_id": i} for i in indices], "index": torch.tensor(indices)}


def code_batch(indices):
    return {"codes": torch.zeros(len(indices), 32, dtype=torch.long), "caption": [CAPTIONS[i] for i in indices],
            "key": [str(i) for i in indices], "meta": [{"image_id": i} for i in indices], "index": torch.tensor(indices)}


def validate(tmp_path, module, callback, *batches):
    trainer = L.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run", version=""),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[callback])
    return trainer.validate(module, dataloaders=DataLoader(list(batches), batch_size=None), verbose=False)[0]


def image_tags(run_dir) -> list[str]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Tags()["images"]


def by_hand(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    a = features_a / features_a.norm(dim=-1, keepdim=True)
    b = features_b / features_b.norm(dim=-1, keepdim=True)
    return max(100 * (a * b).sum(-1).mean().item(), 0.0)


def test_denormalize_inverts_the_normalisation():
    images = denormalize(image_batch([0, 1])["pixel_values"], CLIP_MEAN, CLIP_STD)
    assert np.array_equal(np.asarray(images[1]), uint8_images(4)[1].permute(1, 2, 0).numpy())


def test_text_to_image_clip_score_equals_100_max_cos(tmp_path, model_dirs):
    sd_dir, clip_dir = model_dirs
    callback = CLIPScoreCallback(clip_model=str(clip_dir), sd_path=str(sd_dir), num_images=3, num_inference_steps=2,
                                 seed=5, grid_images=2)
    module = MLLMStandIn()
    results = validate(tmp_path, module, callback, code_batch([0, 1]), code_batch([2, 3]))
    assert module.mllm.seeds == [5, 6, 7], "one code sample per image, seeded by its val index"

    codes = torch.tensor([[0] * 32, [2] * 32, [4] * 32])
    images = callback.decoder(module.seed_tokenizer.decode(codes))
    expected = by_hand(callback.scorer.image_features(images), callback.scorer.text_features(CAPTIONS[:3]))
    assert results["val/clip_score"] == pytest.approx(expected, abs=1e-4)
    grid = Image.open(tmp_path / "run" / "clip_grid_epoch0.png")
    assert grid.width == 128 + 2 * 2 and grid.height > 2 * 128  # 2 rows, one generated image each
    assert image_tags(tmp_path / "run") == ["val/generated_images"]


def test_reconstruction_similarity_uses_original_images(tmp_path, model_dirs):
    sd_dir, clip_dir = model_dirs
    callback = CLIPScoreCallback(clip_model=str(clip_dir), sd_path=str(sd_dir), num_images=4, num_inference_steps=2)
    module = TokenizerStandIn(trains_codebook=True)
    results = validate(tmp_path, module, callback, image_batch([0, 1]), image_batch([2, 3]))

    batch = image_batch([0, 1, 2, 3])
    originals = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in uint8_images(4)]
    regenerated = callback.decoder(module.tokenizer.decode(module.tokenizer.encode(batch["pixel_values"])))
    scorer = callback.scorer
    expected_similarity = by_hand(scorer.image_features(originals), scorer.image_features(regenerated))
    expected_score = by_hand(scorer.image_features(regenerated), scorer.text_features(CAPTIONS))
    assert results["val/recon_clip_similarity"] == pytest.approx(expected_similarity, abs=1e-4)
    assert results["val/recon_clip_score"] == pytest.approx(expected_score, abs=1e-4)
    assert expected_similarity > 0, "the test must tell a clamped 0 from a computed value"
    grid = Image.open(tmp_path / "run" / "clip_grid_epoch0.png")
    assert grid.width == 2 * (128 + 2) + 2  # original | regenerated
    assert image_tags(tmp_path / "run") == ["val/reconstructions"]


def test_contrastive_stage_generates_nothing(tmp_path, model_dirs):
    sd_dir, clip_dir = model_dirs
    callback = CLIPScoreCallback(clip_model=str(clip_dir), sd_path=str(sd_dir), num_images=4, num_inference_steps=2)
    results = validate(tmp_path, TokenizerStandIn(trains_codebook=False), callback, image_batch([0, 1]))
    assert not any(name.startswith("val/recon") for name in results)
