from pathlib import Path

import lightning as L
import pytest
from tests.resume_helpers import assert_resume_reproduces, fit_recording, resume_callbacks
import torch

from seed_lightning.core.data.datamodule import ShardDataModule, ShardSource
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.optim import OptimConfig
from seed_lightning.tokenizer.causal_qformer import CausalQFormerConfig
from seed_lightning.tokenizer.heads import GenerationHeadConfig, ReconstructionHeadConfig
from seed_lightning.tokenizer.model import SeedTokenizerConfig
from seed_lightning.tokenizer.module import TokenizerModule
from seed_lightning.tokenizer.vision import VisionEncoderConfig


def tiny_config(world, vision_trainable=False) -> SeedTokenizerConfig:
    blip2 = str(world.models / "tiny-blip2")
    return SeedTokenizerConfig(
        vision=VisionEncoderConfig(pretrained=blip2, trainable=vision_trainable),
        qformer=CausalQFormerConfig(pretrained=blip2),
        num_codes=64,
        code_dim=8,
        recon_head=ReconstructionHeadConfig(depth=1, num_heads=4),
        gen_head=GenerationHeadConfig(depth=1, num_heads=4, qformer_layers=2, out_dim=64),
    )


def make_module(world, stage="contrastive", **kwargs) -> TokenizerModule:
    module = TokenizerModule(
        model=tiny_config(world, kwargs.pop("vision_trainable", False)),
        text_tokenizer=str(world.models / "bert-tokenizer"),
        stage=stage,
        generation_target=str(world.models / "tiny-sd"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1),
        **kwargs,
    )
    return module


def outside_fit(module: TokenizerModule) -> TokenizerModule:
    """training_step called directly (no loop): logging has nowhere to go."""
    module.log = lambda *args, **kwargs: None
    return module


def make_data(world, batch_size=8, samples=32, **kwargs) -> ShardDataModule:
    return ShardDataModule(
        train=[ShardSource(urls=str(world.shards / "train-000000.tar"))],
        val=str(world.shards / "val-000000.tar"),
        image_size=64,
        batch_size=batch_size,
        num_workers=0,
        samples_per_epoch=samples,
        shuffle_buffer=16,
        **kwargs,
    )


def one_batch(world, batch_size=4) -> dict:
    data = make_data(world, batch_size=batch_size)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def optimizer_params(module) -> set[int]:
    optimizer = module.configure_optimizers()["optimizer"]
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, **kwargs,
    )


def test_contrastive_stage_trains_the_qformer_side_only(default_world, tmp_path):
    module = make_module(default_world)
    module.trainer = trainer(tmp_path, max_steps=1)
    tok = module.tokenizer
    in_optimizer = optimizer_params(module)
    assert {id(p) for p in tok.qformer.parameters()} <= in_optimizer
    assert id(module.temperature) in in_optimizer
    assert {id(p) for p in tok.vision.ln_vision.parameters()} <= in_optimizer
    frozen = [tok.quantizer, tok.encode_task_layer, tok.recon_head, tok.gen_head]
    trunk = [p for n, p in tok.vision.named_parameters() if "post_layernorm" not in n]
    for p in [p for m in frozen for p in m.parameters()] + trunk:
        assert id(p) not in in_optimizer and not p.requires_grad

    loss = outside_fit(module).training_step(one_batch(default_world), 0)
    loss.backward()
    assert all(p.grad is None for p in trunk)
    assert tok.qformer.query_tokens.grad is not None and tok.qformer.query_tokens.grad.abs().sum() > 0
    assert module.temperature.grad is not None


def test_codebook_stage_freezes_the_encoders_and_trains_codebook_and_heads(default_world, tmp_path):
    module = make_module(default_world, stage="codebook", cache_embeddings=False)
    module.trainer = trainer(tmp_path, max_steps=1)
    tok = module.tokenizer
    in_optimizer = optimizer_params(module)
    frozen = list(tok.vision.parameters()) + list(tok.qformer.parameters()) + [module.temperature]
    assert not {id(p) for p in frozen} & in_optimizer
    trainable = [tok.encode_task_layer, tok.quantizer, tok.decode_task_layer, tok.recon_head, tok.gen_head]
    assert {id(p) for m in trainable for p in m.parameters()} <= in_optimizer

    module.train()
    assert not tok.vision.training and not tok.qformer.training
    loss = outside_fit(module).training_step(one_batch(default_world), 0)
    loss.backward()
    assert all(p.grad is None for p in frozen)
    assert tok.encode_task_layer[0].weight.grad.abs().sum() > 0  # straight-through reaches the encoder side
    assert all(p.grad is not None for p in tok.gen_head.parameters() if p.requires_grad)
    assert tok.quantizer.embedding.weight.grad.abs().sum() > 0


def test_a_saved_tokenizer_as_init_from_trains_with_dropout_on(default_world, tmp_path):
    make_module(default_world).tokenizer.save(tmp_path / "stage1")
    tok = make_module(default_world, stage="codebook", init_from=str(tmp_path / "stage1")).tokenizer
    assert tok.gen_head.training and tok.recon_head.training, "Lightning's fit does not call train() itself"
    assert not tok.qformer.training and not tok.vision.model.training  # frozen in stage 2


@pytest.mark.slow
def test_a_stage_1_lightning_checkpoint_as_init_from_loads_as_plain_data(default_world, tmp_path):
    stage1 = make_module(default_world)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=resume_callbacks(tmp_path, None))
    fit.fit(stage1, datamodule=make_data(default_world, batch_size=4, samples=4))
    tok = make_module(default_world, stage="codebook", init_from=str(tmp_path / "ckpt" / "last.ckpt")).tokenizer
    trained = stage1.tokenizer.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in tok.qformer.state_dict(prefix="qformer.").items())


class RunsOnUnpickling:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_init_from_checkpoint_with_pickled_objects_is_refused_unrun(default_world, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "callbacks": RunsOnUnpickling(marker)}, tmp_path / "foreign.ckpt")
    with pytest.raises(ConfigError, match="model.init_from: .*foreign.ckpt holds pickled objects") as error:
        make_module(default_world, stage="codebook", init_from=str(tmp_path / "foreign.ckpt"))
    assert len(str(error.value).splitlines()) == 1
    assert not marker.exists(), "nothing in an untrusted checkpoint runs"


def test_codebook_stage_caches_causal_embeddings(default_world, tmp_path):
    module = make_module(default_world, stage="codebook", cache_dir=str(tmp_path / "cache"))
    fit = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    fit.fit(module, datamodule=make_data(default_world, samples=16))
    cached = module._cache
    assert len(cached) > 0
    batch = one_batch(default_world)
    qualified = [f"{url}#{key}" for url, key in zip(batch["url"], batch["key"])]
    keys = [k for k in qualified if k in cached]
    assert keys == qualified, "a fresh stream's first batch is the first epoch's: all cached"
    with torch.no_grad():
        fresh = module.tokenizer.causal_embeddings(batch["pixel_values"])
    assert torch.allclose(cached.get(keys).float(), fresh, atol=2e-3)

    # A cached training batch travels to the device without its pixels; the encoders are not run.
    fit.training = True
    moved = module.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert "pixel_values" not in moved and moved["causal_embeds"].shape == fresh.shape
    module.tokenizer.vision.forward = None  # would raise if called
    assert torch.allclose(module._causal_embeddings(moved), fresh, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["contrastive", "codebook"])
def test_interrupted_and_resumed_fit_reproduces_the_uninterrupted_losses(default_world, tmp_path, stage):
    def run(root, crash_at=None, ckpt_path=None):
        L.seed_everything(0)
        fit = trainer(root, max_steps=5, limit_val_batches=0, callbacks=resume_callbacks(root, crash_at))
        module = make_module(default_world, stage=stage, cache_embeddings=False)
        data = make_data(default_world, batch_size=4, samples=12)  # 3 batches an epoch: the crash is mid-epoch
        return fit_recording(fit, lambda t: t.fit(module, datamodule=data, ckpt_path=ckpt_path))

    assert_resume_reproduces(run, tmp_path)


def test_data_init_spreads_the_first_batch_over_many_codes(default_world, tmp_path):
    batch = one_batch(default_world, batch_size=8)
    used = {}
    for init in ("uniform", "data"):
        torch.manual_seed(0)
        module = outside_fit(make_module(default_world, stage="codebook", cache_embeddings=False, codebook_init=init))
        module.trainer = trainer(tmp_path, max_steps=1)
        assert bool(module.codebook_initialized) == (init == "uniform")
        module.on_train_start()  # the Trainer's order: the flag is read once, then the steps run
        module.training_step(batch, 0)
        assert bool(module.codebook_initialized)
        with torch.no_grad():
            codes = module.tokenizer.encode(batch["pixel_values"])
        used[init] = len(codes.unique())
    assert used["data"] >= 2 * used["uniform"]
    # The flag travels in the state dict, so a resumed run keeps its trained codebook.
    assert "codebook_initialized" in module.state_dict()


def prepared(world, tmp_path, precision: str, stage: str = "contrastive", **kwargs) -> TokenizerModule:
    """A module after the Trainer's `setup` hook (frozen dtype, FP8, compilation), not yet fitted."""
    module = make_module(world, stage=stage, cache_embeddings=False, **kwargs)
    module.trainer = trainer(tmp_path, max_steps=1, precision=precision)
    module.setup("fit")
    return module


@pytest.mark.parametrize("stage", ["contrastive", "codebook"])
def test_frozen_parts_are_held_in_bf16_under_bf16_precision_and_trained_parts_stay_fp32(default_world, tmp_path, stage):
    module = prepared(default_world, tmp_path, "bf16-mixed", stage)
    frozen_prefixes = ("tokenizer.vision", "tokenizer.qformer") if stage == "codebook" else (
        "tokenizer.vision.model.embeddings", "tokenizer.vision.model.encoder")
    in_optimizer = optimizer_params(module)
    for name, parameter in module.named_parameters():
        if id(parameter) in in_optimizer:
            assert parameter.dtype == torch.float32, name
        elif name.startswith(frozen_prefixes):
            assert parameter.dtype == torch.bfloat16 and not parameter.requires_grad, name
    ln_vision = module.tokenizer.vision.ln_vision.weight
    assert ln_vision.dtype == (torch.bfloat16 if stage == "codebook" else torch.float32)
    module.on_train_start()
    batch = one_batch(default_world)
    with torch.autocast("cpu", torch.bfloat16):
        loss = outside_fit(module).training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    trained = module.tokenizer.qformer.query_tokens if stage == "contrastive" else module.tokenizer.recon_head.pos_embed
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    if stage == "contrastive":
        assert ln_vision.grad is not None and ln_vision.grad.abs().sum() > 0


def test_fp32_precision_keeps_every_weight_fp32(default_world, tmp_path):
    module = prepared(default_world, tmp_path, "32-true", "codebook")
    assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_vision_fp8_converts_the_frozen_trunk_linears_and_leaves_training_unchanged(
    default_world, tmp_path, fake_torchao, monkeypatch
):
    from seed_lightning.core.fp8 import Float8InferenceLinear
    from seed_lightning.tokenizer import module as module_file

    checked = []
    monkeypatch.setattr(module_file, "require_fp8_support", lambda device, option: checked.append(device))
    torch.manual_seed(0)
    plain = prepared(default_world, tmp_path, "bf16-mixed")
    torch.manual_seed(0)
    fp8 = prepared(default_world, tmp_path, "bf16-mixed", vision_fp8=True)
    assert checked == [torch.device("cpu")]  # the device the Trainer runs on
    converted = {name for name, m in fp8.named_modules() if isinstance(m, Float8InferenceLinear)}
    trunk_linears = {name for name, m in plain.named_modules()
                     if isinstance(m, torch.nn.Linear) and name.startswith("tokenizer.vision.model.encoder.")}
    assert converted == trunk_linears and len(converted) == 4 * fp8.tokenizer.vision.config.num_layers
    assert not any(isinstance(m, Float8InferenceLinear) for m in fp8.tokenizer.qformer.modules())
    ln_vision = fp8.tokenizer.vision.ln_vision
    assert type(ln_vision) is torch.nn.LayerNorm and ln_vision.weight.requires_grad
    # Same parameters, trainable set, optimizer groups and state dict as without FP8.
    trainable = lambda m: [(n, p.dtype) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable(fp8) == trainable(plain)
    assert [(n, p.dtype) for n, p in fp8.named_parameters()] == [(n, p.dtype) for n, p in plain.named_parameters()]
    assert optimizer_params(fp8) == {id(p) for p in fp8.parameters() if p.requires_grad}
    state, plain_state = fp8.state_dict(), plain.state_dict()
    assert state.keys() == plain_state.keys() and all(torch.equal(state[k], plain_state[k]) for k in state)
    pixels = one_batch(default_world)["pixel_values"]
    with torch.no_grad():
        reference, out = plain.tokenizer.vision(pixels), fp8.tokenizer.vision(pixels)
    assert fake_torchao.quantized == len(converted)
    cosine = torch.nn.functional.cosine_similarity(out.float(), reference.float(), dim=-1)
    assert 0.97 < cosine.min() and not torch.equal(out, reference)
    fp8.on_train_start()
    with torch.autocast("cpu", torch.bfloat16):
        loss = outside_fit(fp8).training_step(one_batch(default_world), 0)
    loss.backward()
    assert ln_vision.weight.grad.abs().sum() > 0 and fp8.tokenizer.qformer.query_tokens.grad.abs().sum() > 0


def test_vision_fp8_is_refused_before_training_on_a_cpu_or_without_torchao(default_world, tmp_path, fake_torchao,
                                                                           monkeypatch):
    import sys

    from seed_lightning.core.errors import ConfigError

    init_args = {"model": tiny_config(default_world), "text_tokenizer": str(default_world.models / "bert-tokenizer"),
                 "stage": "contrastive", "init_from": None, "gen_weight": 1.0, "generation_target": None,
                 "vision_fp8": False}
    TokenizerModule.check_requirements(init_args, "fit")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.vision_fp8 needs a CUDA GPU with FP8 tensor cores"):
            TokenizerModule.check_requirements({**init_args, "vision_fp8": True}, "fit")
    with pytest.raises(ConfigError, match="this run is on cpu; or set model.vision_fp8: false"):
        prepared(default_world, tmp_path, "bf16-mixed", vision_fp8=True)  # a CPU Trainer on any machine
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ConfigError, match=r"pip install torchao==0\.18\.0"):
        TokenizerModule.check_requirements({**init_args, "vision_fp8": True}, "fit")


def test_vision_fp8_needs_bf16_frozen_weights(default_world, tmp_path, fake_torchao, monkeypatch):
    from seed_lightning.core.errors import ConfigError
    from seed_lightning.tokenizer import module as module_file

    monkeypatch.setattr(module_file, "require_fp8_support", lambda device, option: None)
    with pytest.raises(ConfigError, match="frozen_dtype: bfloat16"):
        prepared(default_world, tmp_path, "32-true", vision_fp8=True)


def test_vision_fp8_needs_a_frozen_vit(default_world, tmp_path):
    from seed_lightning.core.errors import ConfigError

    with pytest.raises(ConfigError, match="frozen ViT"):
        prepared(default_world, tmp_path, "32-true", vision_fp8=True, vision_trainable=True)


def test_compile_compiles_the_frozen_trunk_and_in_stage_2_the_trained_parts(default_world, tmp_path):
    contrastive = prepared(default_world, tmp_path, "32-true", compile=True)
    assert contrastive.tokenizer.vision.model.encoder._compiled_call_impl is not None
    assert contrastive.tokenizer.qformer._compiled_call_impl is None
    codebook = prepared(default_world, tmp_path, "32-true", "codebook", compile=True)
    for part in codebook._stage2_trained_parts():
        assert part._compiled_call_impl is not None
    codebook.setup("validate")  # a second setup (fit, then validate) changes nothing
    assert codebook.tokenizer.vision.model.encoder._compiled_call_impl is not None
