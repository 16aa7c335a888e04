"""Train/eval mode helpers for plain nn.Modules."""

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` and every sub-module in eval mode (dropout off) inside the block; afterwards each sub-module gets
    its own previous mode back. A plain `train(was_training)` would not do: it would also switch on parts a
    training module deliberately keeps in eval mode (a frozen trunk)."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training
