"""What both tokenizer stages share (TokenizerModule): frozen dtype, FP8, compilation, exact resume, checkpoints.
The helpers here build the tiny stage modules for test_contrastive.py and test_codebook.py too."""

import lightning as L
import pytest
from tests.resume_helpers import assert_resume_reproduces, fit_recording, resume_callbacks
import torch

from seed_lightning.core.data.datamodule import ShardDataModule, ShardSource
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.optim import OptimConfig
from seed_lightning.tokenizer.causal_qformer import CausalQFormerConfig
from seed_lightning.tokenizer.codebook import CodebookModule
from seed_lightning.tokenizer.contrastive import ContrastiveModule
from seed_lightning.tokenizer.heads import GenerationHeadConfig, ReconstructionHeadConfig
from seed_lightning.tokenizer.model import SeedTokenizerConfig
from seed_lightning.tokenizer.module import TokenizerModule
from seed_lightning.tokenizer.vision import VisionEncoderConfig

STAGES = [ContrastiveModule, CodebookModule]


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


def make_module(world, stage: type[TokenizerModule] = ContrastiveModule, **kwargs) -> TokenizerModule:
    """The tiny `stage` module; stage 2's L_gen target is the tiny SD unless `generation_target` says otherwise
    (stage 1 ignores it)."""
    generation_target = kwargs.pop("generation_target", str(world.models / "tiny-sd"))
    if stage is CodebookModule:
        kwargs["generation_target"] = generation_target
    return stage(
        model=tiny_config(world, kwargs.pop("vision_trainable", False)),
        text_tokenizer=str(world.models / "bert-tokenizer"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1),
        **kwargs,
    )


def outside_fit(module: TokenizerModule) -> TokenizerModule:
    """training_step called directly (no loop): logging has nowhere to go."""
    module.log = lambda *args, **kwargs: None
    return module


def make_data(world, batch_size=8, samples=32, num_workers=0, **kwargs) -> ShardDataModule:
    return ShardDataModule(
        train=[ShardSource(urls=str(world.shards / "train-000000.tar"))],
        val=str(world.shards / "val-000000.tar"),
        image_size=64,
        batch_size=batch_size,
        num_workers=num_workers,
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


def fit_briefly(world, module: TokenizerModule, tmp_path) -> L.Trainer:
    """Two training steps, then validation on 8 val images; returns the trainer (its metrics, its optimiser)."""
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    fit.fit(module, datamodule=make_data(world, batch_size=4, samples=8, val_batch_size=8))
    return fit


def assert_optimizer_state_only_for(fit: L.Trainer, trained: list[torch.nn.Parameter]) -> None:
    """After real steps, AdamW holds state for exactly the `trained` parameters, and each of them moved."""
    (optimizer,) = fit.optimizers
    assert {id(p) for p in optimizer.state} == {id(p) for p in trained}
    assert all(int(optimizer.state[p]["step"]) == 2 for p in trained)


def save_checkpoint(module: TokenizerModule, path) -> str:
    fit = trainer(path.parent, max_epochs=0)
    fit.strategy.connect(module)
    fit.save_checkpoint(path)
    return str(path)


def test_the_base_is_not_a_stage(default_world):
    with pytest.raises(ConfigError, match="model.class_path: choose a stage.*ContrastiveModule.*CodebookModule"):
        make_module(default_world, TokenizerModule)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_interrupted_and_resumed_fit_reproduces_the_uninterrupted_losses(default_world, tmp_path, stage):
    def run(root, crash_at=None, ckpt_path=None):
        L.seed_everything(0)
        fit = trainer(root, max_steps=5, limit_val_batches=0, callbacks=resume_callbacks(root, crash_at))
        module = make_module(default_world, stage, **({"cache_embeddings": False} if stage is CodebookModule else {}))
        data = make_data(default_world, batch_size=4, samples=12)  # 3 batches an epoch: the crash is mid-epoch
        return fit_recording(fit, lambda t: t.fit(module, datamodule=data, ckpt_path=ckpt_path))

    assert_resume_reproduces(run, tmp_path)


def old_checkpoint(world, tmp_path, stage: type[TokenizerModule]) -> str:
    """A checkpoint as the single TokenizerModule of earlier versions wrote it: hyperparameters with `stage` and
    both stages' arguments, no class path; the temperature and the codebook flag in every state dict."""
    module = make_module(world, stage, generation_target=None)
    path = save_checkpoint(module, tmp_path / f"old-{stage.__name__}.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    hyper_parameters = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    name = "contrastive" if stage is ContrastiveModule else "codebook"
    checkpoint["hyper_parameters"] = {"temperature": 0.07, "label_smoothing": 0.1, "vq_weight": 5.0,
                                      **hyper_parameters, "stage": name}
    checkpoint["state_dict"]["tokenizer.qformer.query_tokens"] += 1  # trained weights, unlike a fresh module's
    checkpoint["state_dict"].setdefault("temperature", torch.tensor(0.07))
    checkpoint["state_dict"].setdefault("codebook_initialized", torch.tensor(True))
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("stage", STAGES)
def test_a_checkpoint_of_the_single_module_of_earlier_versions_fails_in_one_line_naming_the_class(
        default_world, tmp_path, stage):
    path = old_checkpoint(default_world, tmp_path, stage)
    module = make_module(default_world, stage, generation_target=None)
    named = rf"single TokenizerModule.*model.class_path {stage.__module__}.{stage.__name__} with model.init_from"
    with pytest.raises(ConfigError, match=named) as error:
        trainer(tmp_path, limit_val_batches=1).validate(module, make_data(default_world), ckpt_path=path)
    assert "\n" not in str(error.value)
    # What the line proposes works: its weights start a module of the class it names.
    started = make_module(default_world, stage, init_from=path, generation_target=None)
    saved = torch.load(path, weights_only=True)["state_dict"]["tokenizer.qformer.query_tokens"]
    assert torch.equal(started.tokenizer.qformer.query_tokens, saved)
    assert not torch.equal(module.tokenizer.qformer.query_tokens, saved)


def test_a_checkpoint_of_the_other_stage_fails_in_one_line(default_world, tmp_path):
    path = save_checkpoint(make_module(default_world, ContrastiveModule), tmp_path / "stage1.ckpt")
    module = make_module(default_world, CodebookModule, cache_embeddings=False, generation_target=None)
    with pytest.raises(ConfigError, match="holds a ContrastiveModule, but the config builds a CodebookModule"):
        trainer(tmp_path, limit_val_batches=1).validate(module, make_data(default_world), ckpt_path=path)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_checkpoint_loads_back_into_its_class(default_world, tmp_path, stage):
    module = make_module(default_world, stage, export_dir=str(tmp_path / "export"), generation_target=None)
    with torch.no_grad():
        module.tokenizer.qformer.query_tokens += 1  # trained weights, unlike a fresh module's
    loaded = stage.load_from_checkpoint(save_checkpoint(module, tmp_path / "stage.ckpt"))
    assert type(loaded) is stage and loaded.hparams.export_dir == str(tmp_path / "export")
    assert torch.equal(loaded.tokenizer.qformer.query_tokens, module.tokenizer.qformer.query_tokens)


def prepared(world, tmp_path, precision: str, stage: type[TokenizerModule] = ContrastiveModule,
             **kwargs) -> TokenizerModule:
    """A module after the Trainer's `setup` hook (frozen dtype, FP8, compilation), not yet fitted."""
    if stage is CodebookModule:
        kwargs["cache_embeddings"] = False
    module = make_module(world, stage, **kwargs)
    module.trainer = trainer(tmp_path, max_steps=1, precision=precision)
    module.setup("fit")
    return module


@pytest.mark.parametrize("stage", STAGES)
def test_frozen_parts_are_held_in_bf16_under_bf16_precision_and_trained_parts_stay_fp32(default_world, tmp_path, stage):
    module = prepared(default_world, tmp_path, "bf16-mixed", stage)
    codebook = stage is CodebookModule
    frozen_prefixes = ("tokenizer.vision", "tokenizer.qformer") if codebook else (
        "tokenizer.vision.model.embeddings", "tokenizer.vision.model.encoder")
    in_optimizer = optimizer_params(module)
    for name, parameter in module.named_parameters():
        if id(parameter) in in_optimizer:
            assert parameter.dtype == torch.float32, name
        elif name.startswith(frozen_prefixes):
            assert parameter.dtype == torch.bfloat16 and not parameter.requires_grad, name
    ln_vision = module.tokenizer.vision.ln_vision.weight
    assert ln_vision.dtype == (torch.bfloat16 if codebook else torch.float32)
    module.on_train_start()
    batch = one_batch(default_world)
    with torch.autocast("cpu", torch.bfloat16):
        loss = outside_fit(module).training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    trained = module.tokenizer.recon_head.pos_embed if codebook else module.tokenizer.qformer.query_tokens
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    if not codebook:
        assert ln_vision.grad is not None and ln_vision.grad.abs().sum() > 0


def test_fp32_precision_keeps_every_weight_fp32(default_world, tmp_path):
    module = prepared(default_world, tmp_path, "32-true", CodebookModule)
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
                 "init_from": None, "vision_fp8": False}
    ContrastiveModule.check_requirements(init_args, "fit")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.vision_fp8 needs a CUDA GPU with FP8 tensor cores"):
            ContrastiveModule.check_requirements({**init_args, "vision_fp8": True}, "fit")
    with pytest.raises(ConfigError, match="this run is on cpu; or set model.vision_fp8: false"):
        prepared(default_world, tmp_path, "bf16-mixed", vision_fp8=True)  # a CPU Trainer on any machine
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ConfigError, match=r"pip install torchao==0\.18\.0"):
        ContrastiveModule.check_requirements({**init_args, "vision_fp8": True}, "fit")


def test_vision_fp8_needs_bf16_frozen_weights(default_world, tmp_path, fake_torchao, monkeypatch):
    from seed_lightning.core.errors import ConfigError
    from seed_lightning.tokenizer import module as module_file

    monkeypatch.setattr(module_file, "require_fp8_support", lambda device, option: None)
    with pytest.raises(ConfigError, match="frozen_dtype: bfloat16"):
        prepared(default_world, tmp_path, "32-true", vision_fp8=True)


def test_vision_fp8_needs_a_frozen_vit(default_world, tmp_path):
    with pytest.raises(ConfigError, match="frozen ViT"):
        prepared(default_world, tmp_path, "32-true", vision_fp8=True, vision_trainable=True)


def test_compile_compiles_the_frozen_trunk_and_in_stage_2_the_trained_parts(default_world, tmp_path):
    contrastive = prepared(default_world, tmp_path, "32-true", compile=True)
    assert contrastive.tokenizer.vision.model.encoder._compiled_call_impl is not None
    assert contrastive.tokenizer.qformer._compiled_call_impl is None
    codebook = prepared(default_world, tmp_path, "32-true", CodebookModule, compile=True)
    for part in codebook._trained_parts():
        assert part._compiled_call_impl is not None
    codebook.setup("validate")  # a second setup (fit, then validate) changes nothing
    assert codebook.tokenizer.vision.model.encoder._compiled_call_impl is not None


def test_the_encoder_compiles_without_the_fx_graph_cache_that_multi_kernel_breaks(default_world, tmp_path, monkeypatch):
    compiles = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: compiles.append((module, kwargs)))
    module = prepared(default_world, tmp_path, "32-true", compile=True)
    options = {id(part): kwargs.get("options") for part, kwargs in compiles}[id(module.tokenizer.vision.model.encoder)]
    assert options["triton.multi_kernel"] and options["fx_graph_cache"] is False
