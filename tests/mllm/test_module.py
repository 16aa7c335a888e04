"""MLLMModule: what trains, packing equivalence, the text/image loss split, rows from the loader workers, checkpoints.

Uses the tiny OPT and tiny BLIP-2 folders that `make data` builds (random weights, offline).
"""

import dataclasses
import random
from types import SimpleNamespace

import lightning as L
import pytest
from tests.resume_helpers import assert_resume_reproduces, fit_recording, resume_callbacks
import torch
import torch.nn.functional as F

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.optim import build_optimizer
from seed_lightning.core.throughput import ThroughputCallback, linear_flops_per_token
from seed_lightning.mllm.model import LoraSettings, MultimodalLMConfig
from seed_lightning.mllm.module import SEED_TOKENIZER_PREFIX, MLLMModule
from seed_lightning.mllm.packing import IGNORE_INDEX, PackedBatch
from seed_lightning.tokenizer.causal_qformer import CausalQFormerConfig
from seed_lightning.tokenizer.heads import GenerationHeadConfig, ReconstructionHeadConfig
from seed_lightning.tokenizer.model import SeedTokenizer, SeedTokenizerConfig
from seed_lightning.tokenizer.vision import VisionEncoderConfig

pytestmark = pytest.mark.usefixtures("default_world")  # the tiny model folders below

TINY_OPT = "data/models/tiny-opt"
TINY_BLIP2 = "data/models/tiny-blip2"
NUM_CODES = 64
CAPTIONS = ["two large orange stars on a gray background", "a small red circle at the top",
            "three blue squares", "a green cross in the middle on a white background"]


def tiny_tokenizer_dir(directory, num_codes: int = NUM_CODES) -> str:
    """A random SeedTokenizer on the tiny BLIP-2 folder (32 queries), saved like `make train-tokenizer` does."""
    torch.manual_seed(0)
    config = SeedTokenizerConfig(
        vision=VisionEncoderConfig(pretrained=TINY_BLIP2),
        qformer=CausalQFormerConfig(pretrained=TINY_BLIP2),
        num_codes=num_codes,
        recon_head=ReconstructionHeadConfig(depth=1, num_heads=4),
        gen_head=GenerationHeadConfig(depth=1, num_heads=4, qformer_layers=2, out_dim=64),
    )
    SeedTokenizer.from_config(config).save(directory)
    return str(directory)


def make_module(lora: LoraSettings | None = None, **overrides) -> MLLMModule:
    model = MultimodalLMConfig(pretrained=TINY_OPT, num_visual_codes=NUM_CODES, lora=lora,
                               **overrides.pop("model_overrides", {}))
    torch.manual_seed(0)
    return MLLMModule(model=model, **overrides)


def token_batch(num_images: int = 4, seed: int = 0, image_ids: list[int] | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "codes": torch.randint(0, NUM_CODES, (num_images, 32), generator=generator),
        "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(num_images)],
        "key": [f"{i:06d}" for i in range(num_images)],
        "meta": [{"image_id": (image_ids or list(range(num_images)))[i]} for i in range(num_images)],
    }


def train_rows(module: MLLMModule, batch: dict, index: int = 0) -> dict:
    """What the loader workers hand `training_step` for train batch `index` of rank 0."""
    return module.row_builder.train_batch(batch, rank=0, index=index)


def token_shard(directory, num_images: int = 24) -> str:
    """A train token shard of random codes and the CAPTIONS; returns its path."""
    from seed_lightning.mllm.tokens import TokenShardWriter

    generator = torch.Generator().manual_seed(0)
    with TokenShardWriter(directory, prefix="train", maxcount=100) as writer:
        for i in range(num_images):
            writer.write(f"{i:06d}", torch.randint(0, NUM_CODES, (32,), generator=generator), CAPTIONS[i % 4])
    return str(directory / "train-000000.tar")


def token_data(shard: str, batch_size: int, samples_per_epoch: int, num_workers: int = 0, val: str | None = None):
    """A ShardDataModule over one token shard."""
    from seed_lightning.core.data.datamodule import ShardDataModule, ShardSource

    return ShardDataModule(train=[ShardSource(urls=shard)], val=val, kind="codes", batch_size=batch_size,
                           num_workers=num_workers, samples_per_epoch=samples_per_epoch, shuffle_buffer=8)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer_dir(tmp_path_factory.mktemp("seed-tokenizer"))


def test_only_lora_and_configured_modules_enter_the_optimiser(tokenizer_dir):
    module = make_module(LoraSettings(r=4, alpha=8, dropout=0.0), tokenizer=tokenizer_dir)
    optimizer = build_optimizer(module, module.optim_config)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {name for name, p in module.named_parameters() if id(p) in optimised}
    assert names, "something must train"
    assert all("lora_" in name or "modules_to_save" in name for name in names), sorted(names)[:5]
    assert any("lora_A" in name for name in names) and any("embed_tokens" in name for name in names)
    assert not any(name.startswith(SEED_TOKENIZER_PREFIX) for name in names)
    frozen_base = [name for name, p in module.named_parameters() if "base_layer" in name]
    assert frozen_base and not any(name in names for name in frozen_base)
    module.train()
    assert not module.seed_tokenizer.training, "the frozen image tokenizer stays in eval mode"


def test_packed_and_padded_rows_give_the_same_per_sample_losses():
    module = make_module().eval()
    samples, _ = module.row_builder.samples(token_batch(6), random.Random(0))
    with torch.no_grad():
        packed_rows = module.row_builder.rows(samples)
        packed = module.batch_losses(packed_rows)
        padded_rows = dataclasses.replace(module.row_builder, packing=False).rows(samples)
        padded = module.batch_losses(padded_rows)
    assert packed_rows.input_ids.shape[0] < padded_rows.input_ids.shape[0], "packing must share rows"
    for segment in range(1, len(samples) + 1):
        torch.testing.assert_close(packed.token_losses[packed_rows.segment_ids == segment],
                                   padded.token_losses[padded_rows.segment_ids == segment], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=1e-5)
    assert (packed.num_text, packed.num_image) == (padded.num_text, padded.num_image)


def test_text_and_image_losses_split_by_target_token():
    module = make_module().eval()
    samples, _ = module.row_builder.samples(token_batch(4), random.Random(3))
    with torch.no_grad():
        breakdown = module.batch_losses(module.row_builder.rows(samples))
        text, image = [], []
        for ids, is_image in samples:  # each sample alone, cross-entropy written out by hand
            logits = module.mllm(ids[None]).logits[0]
            losses = -F.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]
            image.append(losses[is_image[1:]])
            text.append(losses[~is_image[1:]])
            # Hugging Face's own loss on the sample agrees with the total over its tokens
            torch.testing.assert_close(module.mllm(ids[None], labels=ids[None]).loss, losses.mean())
    text, image = torch.cat(text), torch.cat(image)
    assert breakdown.num_image == len(image) == 32 * len(samples)
    assert breakdown.num_text == len(text)
    torch.testing.assert_close(breakdown.image_loss, image.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(breakdown.text_loss, text.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(breakdown.loss, torch.cat([text, image]).mean(), atol=1e-5, rtol=1e-5)


class RecordBatches(L.Callback):
    """The batches the train and val steps received."""

    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_steps_receive_rows_built_by_the_loader_workers(tmp_path, num_workers):
    shard = token_shard(tmp_path / "tokens", num_images=12)
    module = make_module(max_length=128, p_image_to_text=0.5, sample_seed=7)
    recorder = RecordBatches()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, datamodule=token_data(shard, 4, 12, num_workers, val=shard))
    assert len(recorder.train) == 3 and len(recorder.val) == 3
    # Built in the workers: tensors and counts, no captions; as the builder makes them from the plain stream.
    plain = token_data(shard, 4, 12, num_workers)
    stream = [plain.on_after_batch_transfer(batch, 0) for batch in plain.train_dataloader()]
    for index, (batch, raw) in enumerate(zip(recorder.train, stream, strict=True)):
        assert set(batch) == {"rows", "key"} and isinstance(batch["rows"], PackedBatch)
        expected = module.row_builder.train_batch(raw, rank=0, index=index)["rows"]
        for name, value in vars(expected).items():
            assert torch.equal(getattr(batch["rows"], name), value) if isinstance(value, torch.Tensor) \
                else getattr(batch["rows"], name) == value, name
    for batch in recorder.val:  # both directions, beside what the generation callbacks read
        assert {"codes", "caption", "index", "captioning_rows", "generation_rows"} <= set(batch)
        assert batch["captioning_rows"].num_samples == batch["generation_rows"].num_samples == len(batch["caption"])


def test_steps_refuse_batches_without_rows():
    module = make_module()
    with pytest.raises(ConfigError, match="without 'rows'"):
        module.training_step(token_batch(), 0)
    module._trainer = SimpleNamespace(datamodule=object())
    with pytest.raises(ConfigError, match="cannot build the MLLM's rows"):
        module.setup("fit")


def test_codebook_size_mismatch_is_a_config_error(tmp_path):
    directory = tiny_tokenizer_dir(tmp_path / "tok", num_codes=NUM_CODES * 2)
    with pytest.raises(ConfigError, match="num_visual_codes"):
        make_module(tokenizer=directory)


def test_gradient_checkpointing_with_lora_trains_the_adapters():
    module = make_module(LoraSettings(r=4, alpha=8, dropout=0.0), model_overrides={"gradient_checkpointing": True})
    module.train()
    module.batch_losses(train_rows(module, token_batch(2))["rows"]).loss.backward()
    lora_grads = [p.grad for name, p in module.named_parameters() if "lora_B" in name]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for name, p in module.named_parameters() if "base_layer" in name)


def test_checkpoints_leave_out_the_frozen_image_tokenizer(tokenizer_dir):
    module = make_module(tokenizer=tokenizer_dir)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(name.startswith(SEED_TOKENIZER_PREFIX) for name in checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)


@pytest.mark.slow
def test_interrupted_and_resumed_fit_reproduces_the_uninterrupted_losses(tmp_path):
    shard = token_shard(tmp_path / "tokens")

    def run(root, crash_at=None, ckpt_path=None):
        L.seed_everything(0)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=5, limit_val_batches=0, logger=False, enable_progress_bar=False,
            enable_model_summary=False, deterministic=True, default_root_dir=root,
            callbacks=resume_callbacks(root, crash_at),
        )
        # 3 batches an epoch: the crash is mid-epoch
        data = token_data(shard, batch_size=4, samples_per_epoch=12)
        module = make_module(max_length=128)
        return fit_recording(trainer, lambda t: t.fit(module, datamodule=data, ckpt_path=ckpt_path))

    assert_resume_reproduces(run, tmp_path)


def test_the_throughput_meter_counts_the_tokens_of_the_rows_and_the_stated_flops(tmp_path):
    module = make_module(LoraSettings(r=4, alpha=8, dropout=0.0), max_length=128)
    meter = ThroughputCallback(log_every_n_steps=2, skip_first_steps=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[meter])
    trainer.fit(module, datamodule=token_data(token_shard(tmp_path / "tokens"), batch_size=4, samples_per_epoch=12))
    (point,) = meter.history
    assert point["tokens_per_sec"] >= 35 * point["samples_per_sec"]  # each sample: BOS, 32 codes, 2 markers, text
    assert point["flops_per_sec"] == pytest.approx(point["tokens_per_sec"] * module.flops_per_token())
    _, weights = linear_flops_per_token(module.mllm.model)
    assert 4 * weights < module.flops_per_token() < 6 * weights  # the frozen base weights count 4N, LoRA 6N


def set_up(module: MLLMModule, precision: str, strategy=None) -> MLLMModule:
    """Run the Trainer's `setup` hook (frozen dtype, compilation) on a module outside fit."""
    if strategy is None:
        module.trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                                   enable_progress_bar=False, enable_model_summary=False)
    else:  # Lightning builds FSDP only with GPUs; setup reads just these two attributes
        module._trainer = SimpleNamespace(precision=precision, strategy=strategy, datamodule=None)
    module.setup("fit")
    return module


def test_frozen_weights_are_held_in_bf16_under_bf16_precision_and_generation_still_runs():
    module = set_up(make_module(lora=LoraSettings(r=4, alpha=8)), "bf16-mixed")
    dtypes = {p.requires_grad: set() for p in module.parameters()}
    for parameter in module.parameters():
        dtypes[parameter.requires_grad].add(parameter.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}
    assert module.mllm.compute_dtype == torch.bfloat16
    module.log = lambda *args, **kwargs: None
    with torch.autocast("cpu", torch.bfloat16):
        loss = module.training_step(train_rows(module, token_batch()), 0)
    loss.backward()
    lora_grads = [p.grad for n, p in module.named_parameters() if "lora_B" in n]  # lora_A's is 0 while B is 0
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    # Outside autocast (as the generation callbacks run), mixed weights still generate.
    captions = module.mllm.caption(token_batch(2)["codes"], max_new_tokens=3)
    assert len(captions) == 2


def test_lora_adapters_take_their_input_as_it_comes():
    # peft would copy every projection input to fp32 (the adapters' dtype); autocast casts it back anyway.
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in make_module(lora=LoraSettings(r=4, alpha=8)).modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(layer.cast_input_dtype_enabled for layer in layers)


def test_fp32_precision_and_full_fine_tuning_keep_fp32_weights():
    assert {p.dtype for p in set_up(make_module(lora=LoraSettings(r=4, alpha=8)), "32-true").parameters()} == {torch.float32}
    assert {p.dtype for p in set_up(make_module(lora=None), "bf16-mixed").parameters()} == {torch.float32}


def test_fsdp_with_lora_keeps_frozen_weights_fp32_and_rejects_bf16():
    from lightning.pytorch.strategies import FSDPStrategy

    module = set_up(make_module(lora=LoraSettings(r=4, alpha=8)), "bf16-mixed", FSDPStrategy())
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    with pytest.raises(ConfigError, match="FSDP"):
        set_up(make_module(lora=LoraSettings(r=4, alpha=8), frozen_dtype="bfloat16"), "bf16-mixed", FSDPStrategy())


def test_compile_compiles_every_decoder_layer():
    module = set_up(make_module(lora=LoraSettings(r=4, alpha=8), compile=True), "32-true")
    layers = module.mllm.decoder_layers()
    assert len(layers) == module.mllm.model.get_base_model().config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    # Generation (new shapes every decoding step) runs the layers eagerly, never through the compiler.
    compiled_calls = []
    for layer in layers:
        layer.compile(backend=lambda graph, inputs: compiled_calls.append(1) or graph)
    assert len(module.mllm.caption(token_batch(2)["codes"], max_new_tokens=2)) == 2
    assert compiled_calls == []
    module.log = lambda *args, **kwargs: None
    module.training_step(train_rows(module, token_batch()), 0)  # training does go through the compiled layers
    assert compiled_calls
