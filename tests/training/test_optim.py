import math

import pytest
import torch
from torch import nn

from seed_lightning.errors import ConfigError
from seed_lightning.training.optim import OptimConfig, build_optimizer, build_scheduler, learning_rate, parameter_groups


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
