import io
import math
import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from seed_lightning.core.errors import ConfigError
from seed_lightning.core.optim import (
    AdamWModule,
    OptimConfig,
    build_optimizer,
    build_scheduler,
    learning_rate,
    parameter_groups,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.queries = nn.Parameter(torch.zeros(1, 3, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_groups_exclude_frozen_and_skip_decay_on_bias_and_norms():
    model = Tiny()
    decay, no_decay = parameter_groups(model, 0.05)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == {id(model.linear.weight), id(model.queries)}
    assert ids(no_decay["params"]) == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    optimizer = build_optimizer(model, OptimConfig())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.frozen.parameters()}


def test_nothing_trainable_is_a_config_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError):
        parameter_groups(model, 0.0)


def test_schedule_warms_up_linearly_then_follows_cosine_to_min():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-5, warmup_steps=10)
    assert learning_rate(0, 110, cfg) == pytest.approx(1e-5)
    assert learning_rate(5, 110, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert learning_rate(10, 110, cfg) == pytest.approx(1e-3)
    mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 0.5))
    assert learning_rate(60, 110, cfg) == pytest.approx(mid)
    assert learning_rate(110, 110, cfg) == pytest.approx(1e-4)


def test_warmup_ratio_and_scheduler_drive_the_optimizer():
    cfg = OptimConfig(lr=1e-2, min_lr=0.0, warmup_start_lr=0.0, warmup_ratio=0.5)
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=4)["scheduler"]
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])


def test_bad_values_fail_with_a_config_error():
    with pytest.raises(ConfigError, match="min_lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        OptimConfig(warmup_ratio=1.5)


class GradientNorms(L.Callback):
    """The total gradient norm of each step before clipping, and as the optimiser step received it (the
    gradients stay until the next step zeroes them)."""

    def __init__(self):
        self.before_clipping, self.stepped = [], []

    @staticmethod
    def norm(optimizer) -> float:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_clipping.append(self.norm(optimizer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stepped.append(self.norm(trainer.optimizers[0]))


def tokenizer_module_and_data(world, tmp_path, optim: OptimConfig):
    from tests.tokenizer.test_module import make_data, make_module

    module = make_module(world)
    module.optim_config = optim
    return module, make_data(world, batch_size=4, samples=12)


def mllm_module_and_data(world, tmp_path, optim: OptimConfig):
    from tests.mllm.test_module import make_module, token_data, token_shard

    return make_module(optim=optim, max_length=128), token_data(token_shard(tmp_path / "tokens"), 4, 12)


def fit_three_steps(module, data, tmp_path, **trainer_kwargs) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=0, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data)
    return trainer


@pytest.mark.parametrize("module_and_data", [tokenizer_module_and_data, mllm_module_and_data])
def test_fused_adamw_trains_under_bf16_mixed_with_its_gradients_clipped(default_world, tmp_path, module_and_data):
    # The paper configs: fused AdamW (picked automatically on CUDA), bf16-mixed, gradient_clip_val 1.0.
    module, data = module_and_data(default_world, tmp_path, OptimConfig(lr=1e-3, warmup_steps=1, fused=True))
    norms = GradientNorms()
    trainer = fit_three_steps(module, data, tmp_path, precision="bf16-mixed", callbacks=[norms])
    assert trainer.global_step == 3 and trainer.optimizers[0].defaults["fused"]
    assert len(norms.stepped) == 3
    assert max(norms.before_clipping) > 1.5, "the test needs gradients that clipping changes"
    for before, stepped in zip(norms.before_clipping, norms.stepped):
        assert stepped == pytest.approx(min(before, 1.0), rel=1e-3)


def test_fused_adamw_under_fp16_with_a_grad_scaler_steps_like_the_unfused_one(default_world, tmp_path):
    # fp16 gradients are scaled: the fused step must clip (and apply) the unscaled ones, exactly as the
    # unfused optimiser does after Lightning unscales them.
    from lightning.pytorch.plugins.precision import MixedPrecision

    weights, scales, norms = {}, {}, {}
    for fused in (False, True):
        module, data = mllm_module_and_data(default_world, tmp_path / str(fused),
                                            OptimConfig(lr=1e-3, warmup_steps=1, fused=fused))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        norms[fused] = GradientNorms()
        fit_three_steps(module, data, tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
                        callbacks=[norms[fused]])
        weights[fused] = [p.detach().clone() for p in module.parameters() if p.requires_grad]
        scales[fused] = scaler.get_scale()
    assert scales[True] == scales[False] == 2.0**10  # no step overflowed
    assert max(norms[False].before_clipping) > 1.5, "the test needs gradients that clipping changes"
    for unfused, fused in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-6)


def test_norm_clipping_under_fsdp_goes_through_the_fsdp_root_module():
    # Lightning's FSDPPrecision refuses norm clipping (each rank holds part of the norm); the FSDP root module
    # computes it over all shards. Lightning builds FSDP only on GPUs: the trainer is a stand-in with what the
    # hook reads.
    from lightning.pytorch.plugins.precision import FSDPPrecision

    clipped = []
    module = AdamWModule()
    fsdp_root = SimpleNamespace(clip_grad_norm_=clipped.append)
    module._trainer = SimpleNamespace(precision_plugin=FSDPPrecision("bf16-mixed"), gradient_clip_val=1.0,
                                      gradient_clip_algorithm=None, model=fsdp_root)
    module.configure_gradient_clipping(torch.optim.AdamW(nn.Linear(2, 2).parameters()), 1.0, None)
    assert clipped == [1.0]


def test_checkpoints_carry_the_rng_states_a_resumed_run_draws_from():
    module = AdamWModule()
    checkpoint = {}
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    module.on_save_checkpoint(checkpoint)
    expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    module.on_load_checkpoint(torch.load(buffer, weights_only=True))
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected
