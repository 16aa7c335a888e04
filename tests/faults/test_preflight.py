import shutil
import tempfile
from argparse import ArgumentError
from dataclasses import dataclass

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from seed_lightning.core import preflight
from seed_lightning.core.errors import ConfigError
from seed_lightning.core.preflight import (
    check_accelerator,
    check_free_disk,
    check_launch,
    check_output_dir,
    check_precision,
    check_pretrained,
    format_cli_error,
    run_preflight,
)

GIB = 1024**3


def one_line_error(match, check, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as error:
        check(*args, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_output_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    message = one_line_error("cannot create output directory", check_output_dir, blocker / "run")
    assert str(blocker / "run") in message and "default_root_dir" in message


def test_output_dir_that_is_not_writable(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)  # root ignores chmod
    one_line_error("is not writable", check_output_dir, tmp_path)
    monkeypatch.undo()

    def read_only_filesystem(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_filesystem)
    one_line_error("cannot write in output directory .*Read-only", check_output_dir, tmp_path)


def test_nearly_full_disk(tmp_path, monkeypatch):
    asked = []

    def usage(path):
        asked.append(path)
        return shutil._ntuple_diskusage(100 * GIB, 99.5 * GIB, GIB // 2)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    message = one_line_error("only 0.50 GiB free", check_free_disk, tmp_path / "not" / "yet", min_free_gib=1)
    assert "1 GiB minimum" in message
    assert asked[-1] == tmp_path  # the nearest existing parent
    check_free_disk(tmp_path, min_free_gib=0.25)


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator in ("gpu", "cuda"):
        one_line_error("needs CUDA.*accelerator cpu", check_accelerator, accelerator, devices=1)
    check_accelerator("cpu", devices=2)
    check_accelerator("auto")


def test_more_gpus_requested_than_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for devices in (4, "3", [0, 2], "0,2"):
        one_line_error("only 2 visible", check_accelerator, "gpu", devices)
    for devices in (2, "auto", -1, [1], "0,1"):
        check_accelerator("gpu", devices)


def test_precision_that_does_not_fit_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error("16-mixed .*does not work on CPU.*bf16-mixed", check_precision, "16-mixed", "cpu")
    one_line_error("does not work on CPU", check_precision, 16, "auto")  # auto resolves to CPU here
    check_precision("bf16-mixed", "cpu")
    check_precision("32-true", "auto")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    one_line_error("needs bfloat16, which Tesla V100 lacks", check_precision, "bf16-mixed", "gpu")
    check_precision("16-mixed", "gpu")


LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "GROUP_WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "SLURM_NTASKS",
                      "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def torchrun(monkeypatch, nodes: int, per_node: int) -> None:
    """The environment torchrun gives each process it starts (`--nnodes nodes --nproc-per-node per_node`)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("GROUP_WORLD_SIZE", str(nodes))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    monkeypatch.setenv("WORLD_SIZE", str(nodes * per_node))


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_trainer_layout_must_be_the_one_torchrun_started(monkeypatch, no_launcher):
    torchrun(monkeypatch, nodes=2, per_node=1)
    check_launch(num_nodes=2, devices=1, accelerator="cpu")
    message = one_line_error("torchrun started 2 node.* x 1 process.* num_nodes=1 x devices=1", check_launch, 1, 1,
                             "cpu")
    assert "--trainer.num_nodes 2 --trainer.devices 1" in message and "--nnodes 1 --nproc-per-node 1" in message
    torchrun(monkeypatch, nodes=1, per_node=2)
    check_launch(num_nodes=1, devices=2, accelerator="cpu")
    # The same number of processes split otherwise: Lightning would pass it and crash on a device index.
    one_line_error("--trainer.num_nodes 1 --trainer.devices 2", check_launch, 2, 1, "cpu")
    one_line_error("--trainer.num_nodes 1 --trainer.devices 2", check_launch, 1, "auto", "cpu")  # auto: 1 on CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    one_line_error("--trainer.devices 2", check_launch, 1, -1, "gpu")  # every visible GPU: 8
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_launch(num_nodes=1, devices=-1, accelerator="gpu")


def test_several_nodes_need_a_launcher(monkeypatch, no_launcher):
    message = one_line_error("num_nodes=2 but no launcher", check_launch, 2, 1, "cpu")
    assert "torchrun --nnodes 2 --node-rank R --nproc-per-node 1" in message
    check_launch(num_nodes=1, devices=2, accelerator="cpu")
    monkeypatch.setenv("NODE_RANK", "1")  # Lightning's own launch on every node, ranks set by hand
    check_launch(num_nodes=2, devices=1, accelerator="cpu")
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # srun: Lightning reads the ranks from SLURM
    check_launch(num_nodes=2, devices=2, accelerator="cpu")


def test_run_preflight_passes_on_a_sane_setup_and_creates_the_directory(tmp_path):
    run_preflight(tmp_path / "run", accelerator="cpu", devices=1, precision="bf16-mixed", min_free_gib=0)
    assert (tmp_path / "run").is_dir()


@dataclass
class OptimSettings:
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 10
    """Linear warm-up length."""


class TinyModule(LightningModule):
    def __init__(self, hidden_size: int = 4, optim: OptimSettings = OptimSettings()):  # noqa: B008
        super().__init__()


class OneLineErrorsCLI(LightningCLI):
    """How an entry point uses format_cli_error: it needs the parser for the list of valid keys."""

    def parse_arguments(self, parser, args):
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as exc:
            raise ConfigError(format_cli_error(exc, parser)) from None


def cli_error(args) -> str:
    with pytest.raises(ConfigError) as error:
        OneLineErrorsCLI(TinyModule, args=args, parser_kwargs={"exit_on_error": False}, save_config_callback=None)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.filterwarnings("ignore:.*args parameter")
def test_misspelt_cli_keys_get_the_closest_valid_key(tmp_path):
    assert cli_error(["fit", "--trainer.max_stepz", "5"]) == (
        "unknown option 'trainer.max_stepz'; did you mean 'trainer.max_steps'?"
    )
    assert "did you mean 'model.hidden_size'?" in cli_error(["fit", "--model.hiden_size=5"])
    assert cli_error(["fitt"]) == "unknown subcommand 'fitt'; did you mean 'fit'?"

    config = tmp_path / "config.yaml"
    config.write_text("model:\n  optim:\n    warmup_step: 3\n")
    assert "did you mean 'model.optim.warmup_steps'?" in cli_error(["fit", "--config", str(config)])
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args:\n        save_lst: true\n"
    )
    assert cli_error(["fit", "--config", str(config)]) == (
        "unknown option 'save_lst' for ModelCheckpoint; did you mean 'save_last'?"
    )
    assert "no_such_option" in cli_error(["fit", "--zzz.no_such_option", "1"])
    assert "Expected a <class 'int'>" in cli_error(["fit", "--model.hidden_size", "abc"])


# ---- requirements of the run's classes, checked before any of them is built ------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, online; `cache(repo, *files)` puts files of a repo into it."""
    from huggingface_hub import constants

    root = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def cache(repo: str, *files: str) -> None:
        repo_dir = root / f"models--{repo.replace('/', '--')}"
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text("0" * 40)
        for name in files:
            (repo_dir / "snapshots" / ("0" * 40) / name).parent.mkdir(parents=True, exist_ok=True)
            (repo_dir / "snapshots" / ("0" * 40) / name).write_text("{}")

    return cache


def test_pretrained_folders_need_their_marker_file(tmp_path):
    one_line_error("model.x: folder .*missing does not exist", check_pretrained, str(tmp_path / "missing"), "model.x")
    one_line_error("has no model_index.json", check_pretrained, str(tmp_path), "sd", marker="model_index.json")
    (tmp_path / "model_index.json").write_text("{}")
    check_pretrained(str(tmp_path), "sd", marker="model_index.json")
    check_pretrained(None, "model.x")


def test_hub_ids_pass_when_cached_or_on_a_reachable_hub(hub_cache, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "file_exists", lambda repo, name: asked.append(repo) or repo == "on/hub")
    hub_cache("cached/clip", "config.json")
    check_pretrained("cached/clip", "clip_model")
    check_pretrained("on/hub", "clip_model")
    assert asked == ["on/hub"]  # the cache answers without the network
    one_line_error("the hub has no no/such", check_pretrained, "no/such", "clip_model")

    def unreachable(repo, name):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "file_exists", unreachable)
    one_line_error("hub cannot provide it .*ConnectionError.*go online", check_pretrained, "not/cached", "clip_model")


def test_offline_hub_ids_must_be_cached(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_cache("cached/sd", "model_index.json")
    check_pretrained("cached/sd", "sd_path", marker="model_index.json")
    message = one_line_error("HF_HUB_OFFLINE=1", check_pretrained, "openai/clip-vit-large-patch14", "clip_model")
    assert "not in the Hugging Face cache" in message or "nor in the Hugging Face cache" in message
    assert "huggingface-cli download openai/clip-vit-large-patch14" in message


class ModelBuilt(Exception):
    """Raised where MLLMModule would build the language model: the run got past every start-up check."""


@pytest.fixture
def mllm_run(default_world, tmp_path, monkeypatch):
    """`write(**changes)` writes conf/mllm/tiny.yaml with local tokenizer, shards and output folders (plus the
    changes: callback init_args by class name, model keys) and returns `seed-lightning mllm fit` arguments.
    Building the LM raises ModelBuilt."""
    from seed_lightning.mllm import module as mllm_module
    from tests.mllm.test_module import NUM_CODES, tiny_tokenizer_dir, token_shard

    def build(*args, **kwargs):
        raise ModelBuilt

    monkeypatch.setattr(mllm_module, "MultimodalLM", build)
    monkeypatch.chdir(default_world.repo)  # the config's data/ paths
    shard = token_shard(tmp_path / "tokens")
    tokenizer = tiny_tokenizer_dir(tmp_path / "tokenizer")

    def write(callbacks: dict | None = None, **model) -> list[str]:
        config = yaml.safe_load((default_world.repo / "conf" / "mllm" / "tiny.yaml").read_text())
        config["trainer"].update(default_root_dir=str(tmp_path / "run"), logger=False)
        for callback in config["trainer"]["callbacks+"]:
            name = callback["class_path"].rpartition(".")[2]
            callback.setdefault("init_args", {}).update((callbacks or {}).get(name, {}))
        config["model"].update({"tokenizer": tokenizer, **model})
        config["model"]["model"]["num_visual_codes"] = NUM_CODES
        config["data"].update(train=[{"urls": shard}], val=shard)
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return ["mllm", "fit", "--config", str(path)]

    return write


def cli_exit(args, capsys) -> tuple[int, str]:
    from seed_lightning.cli import main

    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.mark.slow
def test_without_java_the_mllm_run_stops_in_one_line_before_the_model_is_built(mllm_run, no_java, capsys):
    code, error = cli_exit(mllm_run(), capsys)
    assert code == 2 and "\n" not in error
    assert "caption metrics need Java but `java` is not on PATH" in error
    assert "apt-get install" in error and "`score: false`" in error and "CaptionMetricsCallback" in error
    # The documented switch: the run goes on to build the model.
    with pytest.raises(ModelBuilt):
        cli_exit(mllm_run(callbacks={"CaptionMetricsCallback": {"score": False}}), capsys)


@pytest.mark.parametrize(("change", "expected"), [
    ({"callbacks": {"VQAAccuracyCallback": {"questions": "data/vqav2/missing_questions.json"}}},
     "VQAAccuracyCallback: file data/vqav2/missing_questions.json does not exist; download VQAv2"),
    ({"vqa_train": {"questions": "data/synthetic/vqa/questions_train.json", "annotations": "nowhere.json"}},
     "model.vqa_train: file nowhere.json does not exist"),
    ({"callbacks": {"CLIPScoreCallback": {"clip_model": "data/models/no-clip-here"}}},
     "CLIPScoreCallback clip_model: folder data/models/no-clip-here does not exist"),
    ({"callbacks": {"CLIPScoreCallback": {"sd_path": "data/models/no-decoder-here"}}},
     "CLIPScoreCallback sd_path: folder data/models/no-decoder-here does not exist"),
    ({"tokenizer": "checkpoints/no-tokenizer/seed_tokenizer"},
     "model.tokenizer: folder checkpoints/no-tokenizer/seed_tokenizer does not exist; train the tokenizer first"),
])
def test_each_missing_requirement_stops_the_run_in_one_line_before_the_model_is_built(mllm_run, capsys, change,
                                                                                      expected):
    code, error = cli_exit(mllm_run(**change), capsys)
    assert code == 2 and "\n" not in error
    assert expected in error


def test_legacy_hub_ids_without_an_owner_resolve_through_the_cache(hub_cache, monkeypatch):
    # bert-base-uncased (the paper's text tokenizer) has no "owner/" part: it is a hub id, not a missing folder.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_cache("bert-base-uncased", "config.json")
    check_pretrained("bert-base-uncased", "model.text_tokenizer")
    message = one_line_error("nor in the Hugging Face cache", check_pretrained, "bert-base-cased", "model.text_tokenizer")
    assert "bert-base-cased" in message


def test_vision_fp8_without_torchao_stops_the_tokenizer_run_in_one_line_before_the_model_is_built(
    default_world, tmp_path, monkeypatch, capsys
):
    import sys

    from seed_lightning.tokenizer.module import TokenizerModule

    built = []

    def build(*args, **kwargs):
        built.append(True)
        raise ModelBuilt("stop here")

    monkeypatch.setattr(TokenizerModule, "_build_tokenizer", build)
    monkeypatch.chdir(default_world.repo)
    monkeypatch.setitem(sys.modules, "torchao", None)  # not installed
    args = ["tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", "--trainer.default_root_dir", str(tmp_path)]
    code, error = cli_exit([*args, "--model.vision_fp8", "true"], capsys)
    assert code == 2 and "\n" not in error
    assert "model.vision_fp8 needs torchao, which is not installed: pip install torchao==0.18.0" in error
    assert not built
    # FP8 off (the config's default): the run goes on to build the model (the stage class is built by the
    # parser, which reports the constructor's exception its own way).
    with pytest.raises(Exception):
        cli_exit(args, capsys)
    assert built
