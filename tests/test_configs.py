"""The model configs in conf/ chain into each other as the README runs them: stage 1 -> stage 2 ->
extract-tokens -> MLLM, each reading what the one before wrote, with no path to override; and each run's
effective settings (config files, CLI defaults and derived values together) are the recorded ones."""

import fnmatch
import functools
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from seed_lightning.cli import product_class
from seed_lightning.core.model_checkpoint import ModelCheckpoint
from seed_lightning.lightning_cli import CALLBACK_GROUPS, effective_config
from seed_lightning.mllm.extract import build_parser

CONF = Path(__file__).resolve().parents[1] / "conf"
EFFECTIVE = Path(__file__).resolve().parent / "effective_configs"
"""The recorded effective config of each run in RUNS, as `effective` shows it (one YAML file per run)."""
RUNS = {  # name: (command, subcommand, config files layered in this order)
    "tokenizer-tiny": ("tokenizer", "fit", ["tokenizer/tiny.yaml"]),
    "tokenizer-tiny-codebook": ("tokenizer", "fit", ["tokenizer/tiny.yaml", "tokenizer/tiny-codebook.yaml"]),
    "tokenizer-tiny-codebook-validate": ("tokenizer", "validate",
                                         ["tokenizer/tiny.yaml", "tokenizer/tiny-codebook.yaml"]),
    "tokenizer-tiny-cpu": ("tokenizer", "fit", ["tokenizer/tiny.yaml", "trainer/cpu.yaml"]),
    "tokenizer-seed_v1": ("tokenizer", "fit", ["tokenizer/seed_v1.yaml"]),
    "tokenizer-seed_v1-codebook": ("tokenizer", "fit", ["tokenizer/seed_v1.yaml", "tokenizer/seed_v1-codebook.yaml"]),
    "tokenizer-seed_v1-ddp": ("tokenizer", "fit", ["tokenizer/seed_v1.yaml", "trainer/ddp.yaml"]),
    "mllm-tiny": ("mllm", "fit", ["mllm/tiny.yaml"]),
    "mllm-seed_opt2.7b": ("mllm", "fit", ["mllm/seed_opt2.7b.yaml"]),
    "mllm-seed_opt2.7b-fsdp": ("mllm", "fit", ["mllm/seed_opt2.7b.yaml", "trainer/fsdp.yaml"]),
}
CHAINS = {  # (stage 1, stage 2 on top of it, the MLLM on the stage-2 export): names of RUNS
    "paper": ("tokenizer-seed_v1", "tokenizer-seed_v1-codebook", "mllm-seed_opt2.7b"),
    "tiny": ("tokenizer-tiny", "tokenizer-tiny-codebook", "mllm-tiny"),
}


def load(name: str) -> dict:
    return yaml.safe_load((CONF / name).read_text())


def model_args(config: dict) -> dict:
    """The model's init args: under `init_args` where the YAML picks the class (the tokenizer's stages)."""
    return config["model"].get("init_args", config["model"])


def extract_commands(name: str) -> list:
    """The `seed-lightning extract-tokens ...` commands in the comment of a config, parsed by extract's parser."""
    commands, current = [], None
    for line in (CONF / name).read_text().splitlines():
        text = line.removeprefix("#").strip()
        if not line.startswith("#"):
            break
        if text.startswith("seed-lightning extract-tokens"):
            current = [text.removeprefix("seed-lightning extract-tokens")]
            commands.append(current)
        elif current is not None and re.match(r"#\s{4,}--", line):  # a continuation line of the command
            current.append(text)
        else:
            current = None
    return [build_parser().parse_args(shlex.split(" ".join(parts))) for parts in commands]


@pytest.mark.slow
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_each_stage_reads_what_the_one_before_wrote(chain):
    stage1, stage2, mllm = (parsed_config(*RUNS[name]) for name in CHAINS[chain])
    assert model_args(stage2)["init_from"] == f"{stage1['checkpoint']['dirpath']}/last.ckpt"
    assert stage1["checkpoint"]["save_last"]
    assert mllm["model"]["tokenizer"] == model_args(stage2)["export_dir"]


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_the_tokenizer_configs_pick_the_contrastive_then_the_codebook_stage(chain):
    from seed_lightning.tokenizer.codebook import CodebookModule
    from seed_lightning.tokenizer.contrastive import ContrastiveModule

    stage1, stage2, _ = (load(RUNS[name][2][-1]) for name in CHAINS[chain])
    for config, stage in ((stage1, ContrastiveModule), (stage2, CodebookModule)):
        assert config["model"]["class_path"] == f"{stage.__module__}.{stage.__name__}"


def test_the_paper_mllm_config_names_the_extract_commands_that_write_its_token_shards():
    stage1, stage2, mllm = (load(RUNS[name][2][-1]) for name in CHAINS["paper"])
    commands = {args.prefix: args for args in extract_commands(RUNS[CHAINS["paper"][2]][2][-1])}
    assert set(commands) == {"train", "val"}
    image_shards = {"train": stage1["data"]["train"][0]["urls"], "val": stage1["data"]["val"]}
    token_shards = {"train": mllm["data"]["train"][0]["urls"], "val": mllm["data"]["val"]}
    for split, args in commands.items():
        assert args.tokenizer == model_args(stage2)["export_dir"]
        assert args.shards == image_shards[split]  # the images the tokenizer was trained and validated on
        # TokenShardWriter names its shards PREFIX-000000.tar, ... inside --out.
        assert fnmatch.fnmatch(f"{args.out}/{split}-000000.tar", token_shards[split]), (split, args.out)


def test_config_files_named_in_comments_exist():
    for path in CONF.rglob("*.yaml"):
        for named in re.findall(r"conf/[\w./-]+\.yaml", path.read_text()):
            assert (CONF.parent / named).is_file(), f"{path.relative_to(CONF.parent)} names {named}"


def test_every_run_keeps_its_checkpoints_through_the_one_checkpoint_callback():
    # It saves last.ckpt at the end of fit too (core/model_checkpoint.py): a second ModelCheckpoint would not.
    assert CALLBACK_GROUPS["checkpoint"] is ModelCheckpoint
    for path in CONF.rglob("*.yaml"):
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        for callback in (trainer.get("callbacks") or []) + (trainer.get("callbacks+") or []):
            assert not callback["class_path"].endswith("ModelCheckpoint"), path


def test_the_paper_configs_run_eager_under_ddp():
    # Rehearsed on 2 H200s (bench/RESULTS.md, 2026-11-30): stage 2 with compiled heads under DDP did not get
    # through 8 steps in 150 s (dynamo's DDP graph splitting and recompiles), 87 s eager. Compile under DDP is
    # opt-in until a rehearsal shows it through.
    for run in CHAINS["paper"]:
        config = load(RUNS[run][2][-1])
        assert not model_args(config).get("compile", False), run


@functools.cache
def _parsed(command: str, subcommand: str, files: tuple[str, ...]) -> str:
    config = effective_config(product_class(command), [subcommand, *(f"--config={CONF / name}" for name in files)])
    return json.dumps(config)


def parsed_config(command: str, subcommand: str, files: list[str]) -> dict:
    """The config `seed-lightning COMMAND SUBCOMMAND -c FILE...` runs with (defaults and derived values included)."""
    return json.loads(_parsed(command, subcommand, tuple(files)))


def effective(config: dict) -> dict:
    """`config` in a form where two configs are equal when their runs use the same settings: the order of the
    callbacks and plugins does not matter (Lightning orders callbacks itself), a callback configured under its own
    key (`checkpoint`) is one of the trainer's callbacks, and a logger is known by where it writes (save_dir / name
    / version / sub_dir joined) rather than by how that path is split."""
    config = json.loads(json.dumps(config))
    trainer = config["trainer"]
    for key, callback_class in CALLBACK_GROUPS.items():
        if key in config:
            class_path = f"{callback_class.__module__}.{callback_class.__qualname__}"
            trainer["callbacks"] = [*(trainer.get("callbacks") or []), {"class_path": class_path,
                                                                         "init_args": config.pop(key)}]
    for key in ("callbacks", "plugins"):
        trainer[key] = sorted(trainer.get(key) or [], key=lambda spec: json.dumps(spec, sort_keys=True))
    logger = trainer.get("logger")
    if isinstance(logger, dict):
        init = logger["init_args"]
        parts = [init.pop(key, None) for key in ("save_dir", "name", "version", "sub_dir")]
        init["log_dir"] = os.path.normpath(os.path.join(*(str(part) for part in parts if part not in (None, ""))))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_each_run_has_its_recorded_effective_config(run):
    # A change here is a change of what a documented command does: when it is meant, record it again with
    # `SEED_RECORD_CONFIGS=1 pytest tests/test_configs.py -k effective` and review the diff of tests/effective_configs/.
    config = effective(parsed_config(*RUNS[run]))
    recorded = EFFECTIVE / f"{run}.yaml"
    if os.environ.get("SEED_RECORD_CONFIGS"):
        recorded.parent.mkdir(exist_ok=True)
        recorded.write_text(yaml.safe_dump(config, sort_keys=True))
    assert config == yaml.safe_load(recorded.read_text())


@pytest.mark.slow
def test_the_paper_runs_log_mfu():
    for run in CHAINS["paper"]:
        assert parsed_config(*RUNS[run])["throughput"]["peak_flops"] == 989e12, run


def test_every_config_file_is_in_a_recorded_run():
    named = {name for _, _, files in RUNS.values() for name in files}
    assert {str(path.relative_to(CONF)) for path in CONF.rglob("*.yaml")} == named
