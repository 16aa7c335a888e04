"""Typed configs <-> plain data.

Configs are dataclasses (LightningCLI reads their fields and docstrings); checkpoints and saved
models store them as plain dicts, so they load with torch.load(weights_only=True) and without this
package's classes being allow-listed.
"""

import dataclasses
import typing
from typing import Any, TypeVar

from seed_lightning.core.errors import ConfigError

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Rebuild a (nested) config dataclass from plain data, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; was it saved by another version of seed_lightning?")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = dataclass_from_dict(hint, value, where=f"{where}.{name}")
        elif typing.get_origin(hint) is tuple and value is not None:
            value = tuple(value)
        values[name] = value
    return cls(**values)


def as_config(value: Any, cls: type[T], where: str) -> T:
    """`value` as a `cls` instance: a dataclass passes through, a dict (from a checkpoint) is rebuilt."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return dataclass_from_dict(cls, value, where)
    raise ConfigError(f"{where}: expected a {cls.__name__} or a mapping, got {type(value).__name__}")


def to_plain(value: Any) -> Any:
    """Dataclasses (nested in dicts/lists too) -> dicts; everything else unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value


def plain_hyperparameters(init_locals: dict, **configs: Any) -> dict:
    """A LightningModule's __init__ arguments (its `locals()`), with the given typed configs, as plain data."""
    arguments = {k: v for k, v in init_locals.items() if k not in ("self", "__class__")}
    return to_plain({**arguments, **configs})
