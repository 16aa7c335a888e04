"""Read parts of pretrained checkpoints (hub id or local folder) without building the whole model.

A BLIP-2 checkpoint holds a 2.7B-parameter language model next to the ViT and Q-Former we need; these
helpers read its config.json and only the safetensors shards that hold the wanted tensors.
"""

import json
import logging
import os
from collections.abc import Callable, Iterable

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PreTrainedConfig

from seed_lightning.core.errors import ConfigError, first_line

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def resolve_file(path: str | os.PathLike, filename: str) -> str | None:
    """Local path of `filename` inside a folder or hub repo (downloaded/cached as needed); None if absent."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        return candidate if os.path.isfile(candidate) else None
    try:
        return hf_hub_download(path, filename)
    except (EntryNotFoundError, RemoteEntryNotFoundError):
        # Local*EntryNotFound (offline, not cached) is an EntryNotFoundError too: report as absent.
        return None
    except (HFValidationError, RepositoryNotFoundError):
        raise ConfigError(f"{path} is neither an existing folder nor an accessible hub repo; fix the path") from None
    except OSError as error:
        raise ConfigError(f"cannot reach {path} ({type(error).__name__}); give a local folder or go online") from None


def load_hf_config(path: str | os.PathLike) -> PreTrainedConfig:
    """The transformers config (config.json) of a folder or hub id."""
    path = os.fspath(path)
    if resolve_file(path, "config.json") is None:
        raise ConfigError(
            f"{path} has no config.json (or, as a hub id, is neither cached nor downloadable); "
            "point at a transformers checkpoint folder or hub id"
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the config of {path}: {first_line(error)}") from None


def load_state_dict(path: str | os.PathLike, prefixes: str | Iterable[str]) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with one of `prefixes` (names unchanged), read from model.safetensors
    or, for sharded checkpoints, from only the shards that hold such tensors."""
    path = os.fspath(path)
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    index_file = resolve_file(path, WEIGHTS_INDEX_FILE)
    if index_file is not None:
        with open(index_file) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        shard_names = sorted({shard for name, shard in weight_map.items() if name.startswith(prefixes)})
    elif resolve_file(path, WEIGHTS_FILE) is not None:
        shard_names = [WEIGHTS_FILE]
    else:
        raise ConfigError(f"{path} holds no {WEIGHTS_FILE}; re-save the checkpoint with save_pretrained()")
    state: dict[str, torch.Tensor] = {}
    for shard_name in shard_names:
        shard = resolve_file(path, shard_name)
        if shard is None:
            raise ConfigError(f"{path} lists shard {shard_name} in its index but the file is missing; re-download it")
        with safe_open(shard, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(prefixes):
                    state[name] = f.get_tensor(name)
    if not state:
        wanted = " or ".join(prefix + "*" for prefix in prefixes)
        raise ConfigError(f"{path} holds no weights named {wanted}; is it the right checkpoint?")
    return state


def sub_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {name.removeprefix(prefix): tensor for name, tensor in state.items() if name.startswith(prefix)}


def load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    may_be_missing: Callable[[str], bool] = lambda name: False,
    loaded_before: Callable[[str], bool] = lambda name: False,
    hint: str = "wrong checkpoint?",
) -> list[str]:
    """Load `state` into `module`. Unexpected tensors, wrong shapes and missing tensors for which
    `may_be_missing` is False raise ConfigError (missing ones with `hint` as the fix). Missing tensors for which
    `loaded_before` is True already hold weights loaded from another checkpoint: neither required nor reported.
    Returns (and logs) the missing ones left at their init."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:
        shape_problem = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise ConfigError(f"{source} does not fit the model: {shape_problem}") from None
    if unexpected:
        raise ConfigError(f"{source} has tensors the model lacks ({', '.join(unexpected[:3])}, ...); check its config")
    missing = [name for name in missing if not loaded_before(name)]
    required = [name for name in missing if not may_be_missing(name)]
    if required:
        raise ConfigError(f"{source} lacks required tensors ({', '.join(required[:3])}, ...); {hint}")
    if missing:
        log.warning("%s: %d tensors not in it, left at their init: %s", source, len(missing), ", ".join(missing))
    return missing
