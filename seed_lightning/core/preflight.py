"""Checks run before training starts, each failing with one ConfigError line: what is wrong, how to fix it.

`run_preflight` checks the output directory (creatable, writable, enough free space), that a CUDA
accelerator is only requested where CUDA exists, that the precision suits the device, and that the Trainer's
num_nodes x devices is the layout torchrun started (a multi-node run without any launcher is refused).
`check_requirements` lets every class of a run (the LightningModule, the data module, each callback)
check what it needs from its init args (files, folders, hub models, Java) before any of them is built:
a class declares ``check_requirements(cls, init_args: dict, stage: str)`` as a classmethod, using
`check_pretrained` / `check_files` or its own checks. `preflight_config` runs all of it on a parsed
LightningCLI config. `format_cli_error` turns a jsonargparse/LightningCLI parse error into one line that
suggests the closest valid key. Nothing here imports Lightning (but `check_launch` of a multi-node run without
a launcher, which asks Lightning's cluster environments), so it is cheap to run first.
"""

import difflib
import importlib
import inspect
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from seed_lightning.core.errors import ConfigError

_GIB = 1024**3
_FP16_AMP = ("16", "16-mixed")
_BF16 = ("bf16", "bf16-mixed", "bf16-true")
_NOT_CONFIG_KEYS = ("help", "config", "print_config")


def check_output_dir(path: str | os.PathLike, option: str = "trainer.default_root_dir") -> None:
    """The directory exists afterwards (created if needed) and a file can be written in it."""
    directory = Path(path)
    how = f"choose another --{option} or fix its permissions"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output directory {directory} ({exc.strerror or exc}); {how}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {directory} is not writable; {how}")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write in output directory {directory} ({exc.strerror or exc}); {how}") from None


def check_free_disk(
    path: str | os.PathLike, min_free_gib: float = 1.0, option: str = "trainer.default_root_dir"
) -> None:
    """At least `min_free_gib` GiB are free on the filesystem holding `path` (or its nearest existing parent)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    free_gib = shutil.disk_usage(existing).free / _GIB
    if free_gib < min_free_gib:
        raise ConfigError(
            f"only {free_gib:.2f} GiB free at {path}, below the {min_free_gib:g} GiB minimum that checkpoints and"
            f" logs need; free some space, point --{option} at a larger disk, or lower min_free_gib"
        )


def _device_indices(devices: Any) -> int | list[int] | None:
    """Lightning's `devices` as a count or a list of indices; None for "auto"/-1 (whatever is there)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return int(text)
    if isinstance(devices, int):
        return None if devices == -1 else devices
    return [int(index) for index in devices]


def check_accelerator(accelerator: str = "auto", devices: Any = "auto") -> None:
    """A CUDA accelerator ("gpu"/"cuda") is only requested where CUDA exists, with no more devices than visible."""
    if str(accelerator).lower() not in ("gpu", "cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"accelerator={accelerator!r} needs CUDA, but torch {torch.__version__} sees no CUDA GPU on this machine;"
            " set --trainer.accelerator cpu (or auto), or run on a GPU machine"
        )
    try:
        wanted = _device_indices(devices)
    except (TypeError, ValueError):
        raise ConfigError(f"devices={devices!r} is not a count, a list of GPU indices or 'auto'") from None
    visible = torch.cuda.device_count()
    needed = (max(wanted) + 1 if wanted else 0) if isinstance(wanted, list) else (wanted or 0)
    if needed > visible:
        raise ConfigError(
            f"devices={devices!r} needs {needed} CUDA devices but only {visible} visible"
            f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower --trainer.devices"
        )


def check_precision(precision: Any = "32-true", accelerator: str = "auto") -> None:
    """The precision works on the device that `accelerator` resolves to (Lightning would silently change some)."""
    value, device = str(precision), str(accelerator).lower()
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if value in _FP16_AMP and on_cpu:
        raise ConfigError(
            f"precision={value} (fp16 AMP) does not work on CPU and Lightning would silently switch to bf16-mixed;"
            " set --trainer.precision bf16-mixed or 32-true, or run on a GPU"
        )
    uses_cuda = not on_cpu and torch.cuda.is_available()
    if value in _BF16 and uses_cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(
            f"precision={value} needs bfloat16, which {torch.cuda.get_device_name()} lacks;"
            " set --trainer.precision 16-mixed (or 32-true)"
        )


def _devices_per_node(accelerator: str, devices: Any) -> int | None:
    """How many processes per node Lightning makes of `devices` on `accelerator`; None when it cannot tell here."""
    try:
        wanted = _device_indices(devices)
    except (TypeError, ValueError):
        return None
    if wanted is not None:
        return len(wanted) if isinstance(wanted, list) else wanted
    device = str(accelerator).lower()
    if device in ("gpu", "cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.device_count()
    return 1 if str(devices).strip() == "auto" else None  # CPU "auto" is one process; -1 Lightning refuses itself


def _lightning_finds_a_launcher() -> bool:
    """Whether Lightning will take the ranks from a cluster environment (it looks for these, in this order) rather
    than start the processes of one node itself."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    return any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment))


def check_launch(num_nodes: int = 1, devices: Any = "auto", accelerator: str = "auto") -> None:
    """The Trainer's `num_nodes` x `devices` is the layout that launched this process. Under torchrun: its nodes
    (GROUP_WORLD_SIZE) and processes per node (LOCAL_WORLD_SIZE); Lightning would stop only after the models load,
    with a traceback, or crash on a device index when the product matches but the split does not. Without any
    launcher Lightning knows (torchrun, SLURM, LSF, MPI), `num_nodes` > 1 needs NODE_RANK: otherwise every node
    calls itself node 0 and the first waits for the others until the rendezvous times out."""
    per_node = _devices_per_node(accelerator, devices)
    if torch.distributed.is_available() and torch.distributed.is_torchelastic_launched():
        nodes, launched = int(os.environ["GROUP_WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
        if num_nodes != nodes or per_node not in (None, launched):
            raise ConfigError(
                f"torchrun started {nodes} node(s) x {launched} process(es) per node but the Trainer is set to"
                f" num_nodes={num_nodes} x devices={devices}; set --trainer.num_nodes {nodes} --trainer.devices"
                f" {launched}, or launch torchrun with --nnodes {num_nodes} --nproc-per-node {per_node or 'DEVICES'}"
            )
        return
    if num_nodes > 1 and "NODE_RANK" not in os.environ and not _lightning_finds_a_launcher():
        raise ConfigError(
            f"num_nodes={num_nodes} but no launcher started this process as one of {num_nodes} nodes; run it on every"
            f" node with torchrun --nnodes {num_nodes} --node-rank R --nproc-per-node {per_node or 'DEVICES'}"
            " --master-addr HOST --master-port PORT -m seed_lightning.cli ..., or srun under SLURM (README: Scaling"
            " out), or set --trainer.num_nodes 1"
        )


def run_preflight(
    output_dir: str | os.PathLike,
    accelerator: str = "auto",
    devices: Any = "auto",
    precision: Any = "32-true",
    min_free_gib: float = 1.0,
    num_nodes: int = 1,
) -> None:
    """All start-up checks, in order; the first failure raises ConfigError (one line)."""
    check_output_dir(output_dir)
    check_free_disk(output_dir, min_free_gib)
    check_accelerator(accelerator, devices)
    check_precision(precision, accelerator)
    check_launch(num_nodes, devices, accelerator)


_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
"""A hub repo id: "name" (legacy ids such as bert-base-uncased) or "owner/name"."""


def is_hub_id(source: str) -> bool:
    """True for a Hugging Face hub id ("owner/name", or a legacy owner-less "name" such as bert-base-uncased)
    that is not an existing local path."""
    return _HUB_ID.fullmatch(source) is not None and not os.path.exists(source)


def check_pretrained(
    source: str | None, option: str, marker: str = "config.json",
    how: str = "point it at a local folder or a Hugging Face hub id (owner/name)",
) -> None:
    """`source` is a local folder holding `marker`, or a hub id whose `marker` is in the local Hugging Face
    cache or on the hub (reachable now). None passes (nothing to load)."""
    if source is None:
        return
    if not is_hub_id(source):
        check_folder(source, option, marker, how=how)
        return
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, marker), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{option}: {source} is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}),"
            f" and HF_HUB_OFFLINE=1 forbids downloading it; run `huggingface-cli download {source}` where there is"
            " internet (same HF_HOME), or point it at a local folder"
        )
    try:
        found = file_exists(source, marker)
    except Exception as error:  # connection, timeout, gated or private repo: all mean "cannot get it now"
        raise ConfigError(
            f"{option}: {source} is not in the Hugging Face cache and the hub cannot provide it"
            f" ({type(error).__name__}); go online (or `huggingface-cli login` for a gated repo), or point it at a"
            " local folder"
        ) from None
    if not found:
        raise ConfigError(f"{option}: the hub has no {source} (with {marker}); check the id, or {how}")


def check_folder(path: str, option: str, *markers: str, how: str) -> None:
    """`path` is an existing folder holding every file named in `markers`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{option}: folder {path} does not exist; {how}")
    for marker in markers:
        if not (folder / marker).is_file():
            raise ConfigError(f"{option}: {path} has no {marker}; {how}")


def check_files(option: str, *paths: str | None, how: str = "check the path") -> None:
    """Each path that is not None is an existing file."""
    for path in paths:
        if path is not None and not Path(path).expanduser().is_file():
            raise ConfigError(f"{option}: file {path} does not exist; {how}")


def _class_from_path(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def check_requirements(classes_and_args: list[tuple[type | str, dict[str, Any]]], stage: str) -> None:
    """Calls ``cls.check_requirements(init_args, stage)`` of every (class or class path, init args) that has one;
    the first failing requirement raises its one-line ConfigError/DataError."""
    for cls, init_args in classes_and_args:
        cls = _class_from_path(cls) if isinstance(cls, str) else cls
        check = getattr(cls, "check_requirements", None)
        if check is not None:
            check(init_args, stage)


def _plain(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else value


def preflight_config(config: Any, model_class: type, datamodule_class: type, stage: str) -> None:
    """Every start-up check of a LightningCLI run on its parsed `config` (one subcommand's), before any class is
    instantiated: `run_preflight` on the trainer settings, then `check_requirements` of the model, the data
    module and every configured callback."""
    trainer = config.trainer
    run_preflight(trainer.default_root_dir or os.getcwd(), trainer.accelerator, trainer.devices, trainer.precision,
                  num_nodes=trainer.num_nodes)
    callbacks = trainer.callbacks or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    parts = [_class_and_init_args(config.model, model_class), (datamodule_class, _plain(config.data))]
    parts += [_class_and_init_args(callback) for callback in callbacks]
    check_requirements(parts, stage)


def _class_and_init_args(value: Any, default_class: type | None = None) -> tuple[type | str, dict[str, Any]]:
    """(class or class path, init args) of a parsed config value: a `class_path` object (a callback; a model whose
    subclass the YAML picks) or the init args of `default_class`."""
    if "class_path" not in value:
        return default_class, _plain(value)
    # A class that takes no arguments is parsed without `init_args`.
    return value.class_path, _plain(getattr(value, "init_args", None)) or {}


def parser_keys(parser: Any) -> list[str]:
    """Every option key a jsonargparse parser accepts (all subcommands included), e.g. `trainer.max_steps`."""
    keys = []
    for action in parser._actions:
        if isinstance(action.choices, dict):  # subcommands: a parser per choice
            keys += [key for sub in action.choices.values() if hasattr(sub, "_actions") for key in parser_keys(sub)]
            continue
        dest = action.dest
        if dest and dest not in _NOT_CONFIG_KEYS and not dest.endswith(".help"):
            keys.append(dest)
    return sorted(set(keys))


def _init_parameters(class_path: str) -> list[str]:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        return [name for name in inspect.signature(cls).parameters if name not in ("args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _closest(key: str, candidates: list[str]) -> str | None:
    # Prefer a sibling (same parent key), so `trainer.max_stepz` suggests `trainer.max_steps`.
    parent = key.rpartition(".")[0]
    siblings = [c for c in candidates if c.rpartition(".")[0] == parent]
    for pool in (siblings, candidates):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None


def _unknown_key(key: str, candidates: list[str], owner: str = "") -> str:
    where = f" for {owner}" if owner else ""
    best = _closest(key, candidates)
    hint = f"did you mean '{best}'?" if best else "run with --help to list the valid keys"
    return f"unknown option '{key}'{where}; {hint}"


def format_cli_error(exc: BaseException, parser: Any | None = None) -> str:
    """One line for a LightningCLI/jsonargparse parse error; unknown or misspelt keys get the closest valid key.

    `parser` (the jsonargparse parser, e.g. the one `LightningCLI.parse_arguments` receives) supplies the
    valid keys; without it only keys of `class_path` objects and subcommand names can be suggested.
    """
    message = str(exc)
    link = re.search(r"argument \w*\(([\w.]+)\) --> ([\w.]+):", message)
    if link:  # a value given for an argument that another one decides
        source, target = link.groups()
        return f"{target} follows {source} and cannot be set; set {source} instead"
    keys = parser_keys(parser) if parser is not None else []
    class_option = re.search(r"class_path '([\w.]+)':\s*(?:Option|Key) '([^']+)' is not accepted", message)
    if class_option:
        class_path, key = class_option.groups()
        return _unknown_key(key, _init_parameters(class_path), owner=class_path.rpartition(".")[2])
    group_option = re.search(r"Group '([^']+)' does not accept option '([^']+)'", message)
    if group_option:
        return _unknown_key(f"{group_option[1]}.{group_option[2]}", keys)
    option = re.search(r"does not accept option '([^']+)'|Option '([^']+)' is not accepted", message)
    if option:
        return _unknown_key(option[1] or option[2], keys)
    unrecognized = re.search(r"unrecognized arguments: (.*)", message)
    if unrecognized:
        flags = [token for token in unrecognized[1].split() if token.startswith("--")]
        if flags:
            return _unknown_key(flags[0].removeprefix("--").split("=", 1)[0], keys)
    choice = re.search(r"argument (\w+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        choices = re.findall(r"'([^']*)'", choice[3])
        best = _closest(choice[2], choices)
        hint = f"did you mean '{best}'?" if best else f"choose from {', '.join(choices)}"
        return f"unknown {choice[1]} '{choice[2]}'; {hint}"
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
