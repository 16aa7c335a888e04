"""The paper path, end to end, on random full-size weights: the pre-flight before a real run.

Run through ``bench/rehearsal.sh`` (it prepares the environment); ``--help`` lists the options. In the work
dir (the current directory of every command, so the configs' relative ``data/...`` and ``checkpoints/...``
paths land there) it builds the hub cache and the data, then runs the paper configs through the real CLI:

    hub-cache  random checkpoints in the hub layouts (bench/rehearsal/hub_cache.py)
    resolve    every hub id resolves offline through the project's loaders
    data       image shards, the Karpathy val shards (via seed_lightning.core.data.coco), VQAv2 files
    stage1     seed-lightning tokenizer fit -c conf/tokenizer/seed_v1.yaml              (+ one validation)
    stage2     ... -c conf/tokenizer/seed_v1-codebook.yaml  (generation loss: SD's text encoder)
    extract    torchrun --nproc_per_node N -m seed_lightning.cli extract-tokens  (train, then val)
    mllm       seed-lightning mllm fit -c conf/mllm/seed_opt2.7b.yaml  (validation with its callbacks)
    evaluate   seed-lightning mllm evaluate -c conf/mllm/seed_opt2.7b.yaml --ckpt_path .../last.ckpt  (every device)
    generate   seed-lightning generate "CAPTION" -o generated.png --sd CompVis/stable-diffusion-v1-4

Each stage gets only data paths, step counts, batch sizes (and, on CPU, the device settings) overridden, in an
overlay YAML under ``overrides/`` layered after the paper configs; the report lists every overridden key. A
stage that fails does not stop the others; a stage whose inputs are missing is reported as skipped.
"""

import argparse
import copy
import datetime
import functools
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image

from bench.rehearsal import data as rehearsal_data
from bench.rehearsal.hub_cache import SD
from bench.rehearsal.measure import (
    MemorySampler,
    StageResult,
    format_table,
    last_error_line,
    scalar_events,
    steady_rate,
    write_report,
)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
STAGE1_CONFIGS = [CONF / "tokenizer" / "seed_v1.yaml"]
STAGE2_CONFIGS = STAGE1_CONFIGS + [CONF / "tokenizer" / "seed_v1-codebook.yaml"]
MLLM_CONFIGS = [CONF / "mllm" / "seed_opt2.7b.yaml"]
TRAIN_TOKENS = ("data/cc3m/tokens", "train")
VAL_TOKENS = ("data/coco/tokens", "val")
"""(--out, --prefix) of extract-tokens, as the MLLM config's data.train / data.val patterns expect."""
GENERATE_CAPTION = "two small red circles at the top on a white background"
STAGES = ("hub-cache", "resolve", "data", "stage1", "stage2", "extract", "mllm", "evaluate", "generate")


@dataclass(frozen=True)
class Scale:
    """Per-GPU batch sizes, step counts and data amounts of a scale (the model shapes are the configs')."""

    num_train: int
    num_val: int
    steps: int
    stage1_batch: int
    stage2_batch: int
    mllm_batch: int
    clip_images: int
    """CLIPScoreCallback.num_images: val captions turned into SD images (the config's 64 take minutes)."""


SCALES = {
    "full": Scale(num_train=256, num_val=40, steps=8, stage1_batch=64, stage2_batch=64, mllm_batch=32,
                  clip_images=8),
    "tiny": Scale(num_train=128, num_val=20, steps=6, stage1_batch=8, stage2_batch=8, mllm_batch=8, clip_images=4),
}


@dataclass
class Settings:
    scale: str
    accelerator: str
    devices: int
    work: Path
    out: Path
    python: str
    stages: list[str]
    steps: int
    timeout_s: int
    sizes: Scale
    all_gpus: bool = True
    """On GPU: `devices` is every GPU of the host (the configs' `devices: -1 / auto` then stand)."""

    @property
    def cache(self) -> Path:
        return self.work / "hf-cache"

    @property
    def on_gpu(self) -> bool:
        return self.accelerator == "gpu"


@dataclass
class Stage:
    name: str
    title: str
    commands: list[list[str]]
    needs: list[tuple[Path, str]] = field(default_factory=list)
    """(input path relative to the work dir, the stage that makes it)."""
    cleans: list[str] = field(default_factory=list)
    """Its outputs (relative to the work dir), removed before the rehearsal starts when the stage is to run, so
    that no later stage reads what an earlier rehearsal left."""
    overlay: dict | None = None
    finish: Callable[[StageResult], None] | None = None
    """Fills throughput and notes after the stage ran."""


# ---- configs ------------------------------------------------------------------------------------
def effective(command: str, paths: list[Path]) -> dict:
    """The settings `seed-lightning COMMAND fit -c PATH...` runs with: the files layered, the CLI's defaults and the
    values it derives (the logger and checkpoint folders) included."""
    return json.loads(_effective(command, tuple(paths)))


@functools.cache
def _effective(command: str, paths: tuple[Path, ...]) -> str:
    from seed_lightning.cli import product_class
    from seed_lightning.lightning_cli import effective_config

    return json.dumps(effective_config(product_class(command), ["fit", *(f"--config={path}" for path in paths)]))


def flatten(overlay: dict, prefix: str = "") -> list[str]:
    """`a.b: value` lines of an overlay; the callbacks list is summarised by the changes made to it."""
    lines = []
    for key, value in overlay.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += flatten(value, name + ".")
        elif key != "callbacks":
            lines.append(f"{name}: {value}")
    return lines


def logger_dir(config: dict) -> Path:
    """save_dir/name/version/sub_dir of the config's TensorBoardLogger."""
    init = config["trainer"]["logger"]["init_args"]
    return Path(init["save_dir"], init.get("name") or "", str(init.get("version") or ""), init.get("sub_dir") or "")


def training_overlay(settings: Settings, batch_size: int, train_urls: str | None = None) -> dict:
    """Step counts, batch size, the data path and (on CPU) the device settings of a fit stage."""
    overlay: dict = {
        "trainer": {"max_steps": settings.steps, "val_check_interval": settings.steps, "log_every_n_steps": 1},
        "data": {"batch_size": batch_size},
    }
    if train_urls is not None:
        overlay["data"]["train"] = [{"urls": train_urls}]
    return device_overlay(settings, overlay)


def device_overlay(settings: Settings, overlay: dict) -> dict:
    """On CPU: the accelerator and device count, no torch.compile and one loader worker per rank (the paper's
    compile and 8 workers per rank would take most of a 2-core machine's time). On GPU: the device count only
    when it is not every GPU of the host."""
    if settings.on_gpu and not settings.all_gpus:
        overlay.setdefault("trainer", {})["devices"] = settings.devices
    if not settings.on_gpu:
        overlay.setdefault("trainer", {}).update(accelerator="cpu", devices=settings.devices)
        overlay.setdefault("model", {})["compile"] = False
        overlay.setdefault("data", {})["num_workers"] = 1
    return overlay


def mllm_overlay(settings: Settings, config: dict, notes: list[str]) -> dict:
    overlay = training_overlay(settings, settings.sizes.mllm_batch)
    callbacks = copy.deepcopy(config["trainer"]["callbacks"])
    clip = next(c for c in callbacks if c["class_path"].endswith(".CLIPScoreCallback"))
    clip["init_args"]["num_images"] = settings.sizes.clip_images
    if shutil.which("java") is None:  # the documented switch for machines without Java
        captions = next(c for c in callbacks if c["class_path"].endswith(".CaptionMetricsCallback"))
        captions.setdefault("init_args", {})["score"] = False
        notes.append("no java on PATH: caption metrics not scored (score: false; put a JRE .deb in .jre/)")
    overlay["trainer"]["callbacks"] = callbacks
    return overlay


def callback_changes(config: dict, overlay: dict) -> list[str]:
    """The overlay's changes to the config's callbacks list, one line each."""
    if "callbacks" not in overlay.get("trainer", {}):
        return []
    changes = []
    new = {c["class_path"]: c for c in overlay["trainer"]["callbacks"]}
    for old in config["trainer"]["callbacks"]:
        name = old["class_path"].rpartition(".")[2]
        if old["class_path"] not in new:
            changes.append(f"trainer.callbacks: {name} removed")
            continue
        for key, value in new[old["class_path"]].get("init_args", {}).items():
            if old.get("init_args", {}).get(key) != value:
                changes.append(f"trainer.callbacks[{name}].{key}: {value}")
    return changes


# ---- the plan -----------------------------------------------------------------------------------
def cli(settings: Settings, *args: str) -> list[str]:
    return [settings.python, "-m", "seed_lightning.cli", *args]


def config_args(configs: list[Path], overlay_file: Path) -> list[str]:
    return [part for path in [*configs, overlay_file] for part in ("-c", str(path))]


def plan(settings: Settings, notes: dict[str, list[str]]) -> list[Stage]:
    sizes, work, py = settings.sizes, settings.work, settings.python
    world = settings.devices
    stage1, stage2 = effective("tokenizer", STAGE1_CONFIGS), effective("tokenizer", STAGE2_CONFIGS)
    mllm = effective("mllm", MLLM_CONFIGS)
    stage1_ckpt = stage2["model"]["init_args"]["init_from"]
    tokenizer = stage2["model"]["init_args"]["export_dir"]
    mllm_ckpt_dir = Path(mllm["checkpoint"]["dirpath"])
    mllm_export = Path(mllm["model"]["export_dir"])
    train_urls = rehearsal_data.train_shard_pattern(sizes.num_train)
    val_urls = stage1["data"]["val"]
    overlays = {
        "stage1": training_overlay(settings, sizes.stage1_batch, train_urls),
        "stage2": training_overlay(settings, sizes.stage2_batch, train_urls),
        "mllm": mllm_overlay(settings, mllm, notes.setdefault("mllm", [])),
    }
    notes["evaluate"] = notes["mllm"]  # the same overlay
    # Two stage-2 epochs within the steps, so that the second reads the embedding cache the first wrote.
    overlays["stage2"]["data"]["samples_per_epoch"] = settings.steps // 2 * world * sizes.stage2_batch
    overlays["evaluate"] = overlays["mllm"]
    overlay_file = {name: work / "overrides" / f"{name}.yaml" for name in overlays}
    hub_check = [py, "-m", "bench.rehearsal.hub_cache", "--cache", str(settings.cache), "--scale", settings.scale,
                 "--check"] + (["--load-weights"] if settings.scale == "tiny" else [])

    def extract(shards: str, out_prefix: tuple[str, str]) -> list[str]:
        launcher = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        return launcher + ["-m", "seed_lightning.cli", "extract-tokens", "--tokenizer", tokenizer, "--shards", shards,
                           "--out", out_prefix[0], "--prefix", out_prefix[1], "--no-progress"]

    def fit_rate(log_dir: Path, batch: int) -> Callable[[StageResult], None]:
        def finish(result: StageResult) -> None:
            rate = steady_rate(scalar_events(work / log_dir, "train/loss"), batch * world)
            if rate is not None:
                result.throughput = f"{rate[0]:.1f} img/s ({world} x {batch}/step, {rate[1]} steps)"
        return finish

    def mllm_finish(result: StageResult) -> None:
        fit_rate(logger_dir(mllm), sizes.mllm_batch)(result)
        per_rank = [value for _, _, value in scalar_events(work / logger_dir(mllm), "throughput/tokens_per_sec")]
        if len(per_rank) > 2:
            tokens = statistics.median(per_rank[2:]) * world
            result.throughput = f"{tokens:,.0f} tok/s (rank 0's median x {world}); " + result.throughput
        run_dir = work / logger_dir(mllm)
        ran = [name for name, pattern in (("captions", "captions_epoch*.json"), ("VQA", "vqa_results_epoch*.json"),
                                          ("CLIP score", "clip_grid_epoch*.png")) if list(run_dir.glob(pattern))]
        result.notes.append("validation callbacks that wrote results: " + (", ".join(ran) or "none"))

    def extract_finish(result: StageResult) -> None:
        count = sum(1 for directory, _ in (TRAIN_TOKENS, VAL_TOKENS) for _ in (work / directory).glob("*.tar"))
        images = sizes.num_train + sizes.num_val
        if result.wall_s:
            result.throughput = f"{images / result.wall_s:.1f} img/s incl. start-up ({images} images, {count} shards)"

    def evaluate_finish(result: StageResult) -> None:
        results = work / mllm_ckpt_dir / "results.json"
        if results.is_file():
            metrics = json.loads(results.read_text())["metrics"]
            shown = [f"{k.removeprefix('val/')} {v:.3g}" for k, v in metrics.items()
                     if k in ("val/CIDEr", "val/vqa_acc", "val/clip_score", "val/caption_loss")]
            result.notes.append("metrics: " + ", ".join(shown))
        if result.wall_s:
            result.throughput = f"{sizes.num_val / result.wall_s:.2f} val img/s incl. start-up"

    def generate_finish(result: StageResult) -> None:
        image = work / "generated.png"
        if image.is_file():
            with Image.open(image) as opened:
                result.notes.append(f"{opened.width}x{opened.height} image")

    stages = [
        Stage("hub-cache", "hub cache (random weights)", [[py, "-m", "bench.rehearsal.hub_cache", "--cache",
              str(settings.cache), "--scale", settings.scale]]),
        Stage("resolve", "hub ids resolve offline", [hub_check], needs=[(settings.cache, "hub-cache")]),
        Stage("data", "data (shards, Karpathy val, VQAv2)", [[py, "-m", "bench.rehearsal.data", "--out", str(work),
              "--num-train", str(sizes.num_train), "--num-val", str(sizes.num_val)]], cleans=["data"]),
        Stage("stage1", "stage 1 (contrastive) fit + val",
              [cli(settings, "tokenizer", "fit", *config_args(STAGE1_CONFIGS, overlay_file["stage1"]))],
              needs=[(Path("data/cc3m"), "data"), (settings.cache, "hub-cache")],
              cleans=[str(Path(stage1["trainer"]["default_root_dir"]))], overlay=overlays["stage1"],
              finish=fit_rate(logger_dir(stage1), sizes.stage1_batch)),
        Stage("stage2", "stage 2 (codebook + generation loss) fit + val",
              [cli(settings, "tokenizer", "fit", *config_args(STAGE2_CONFIGS, overlay_file["stage2"]))],
              needs=[(Path(stage1_ckpt), "stage1")],
              cleans=[str(Path(stage2["trainer"]["default_root_dir"])), tokenizer], overlay=overlays["stage2"],
              finish=fit_rate(logger_dir(stage2), sizes.stage2_batch)),
        Stage("extract", f"extract-tokens ({world} procs, train + val)",
              [extract(train_urls, TRAIN_TOKENS), extract(val_urls, VAL_TOKENS)],
              needs=[(Path(tokenizer), "stage2")], cleans=[TRAIN_TOKENS[0], VAL_TOKENS[0]], finish=extract_finish),
        Stage("mllm", "MLLM fit + val (captions, VQA, CLIP score)",
              [cli(settings, "mllm", "fit", *config_args(MLLM_CONFIGS, overlay_file["mllm"]))],
              needs=[(Path(TRAIN_TOKENS[0]), "extract"), (Path(VAL_TOKENS[0]), "extract"), (Path(tokenizer), "stage2")],
              cleans=[str(Path(mllm["trainer"]["default_root_dir"]))], overlay=overlays["mllm"], finish=mllm_finish),
        Stage("evaluate", f"evaluate mllm ({world} devices)",
              [cli(settings, "mllm", "evaluate", *config_args(MLLM_CONFIGS, overlay_file["evaluate"]),
                   "--ckpt_path", str(mllm_ckpt_dir / "last.ckpt"))],
              needs=[(mllm_ckpt_dir / "last.ckpt", "mllm")], cleans=[str(mllm_ckpt_dir / "results.json")],
              overlay=overlays["evaluate"], finish=evaluate_finish),
        Stage("generate", "text-to-image (SD pipeline)",
              [cli(settings, "generate", GENERATE_CAPTION, "-o", "generated.png", "--mllm", str(mllm_export / "merged"),
                   "--tokenizer", tokenizer, "--sd", SD)],
              needs=[(mllm_export / "merged", "mllm"), (Path(tokenizer), "stage2")], cleans=["generated.png"],
              finish=generate_finish),
    ]
    return [stage for stage in stages if stage.name in settings.stages]


# ---- running ------------------------------------------------------------------------------------
def stage_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    python_path = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        PYTHONPATH=os.pathsep.join(dict.fromkeys(python_path)), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
        HF_HUB_CACHE=str(settings.cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
    )
    return env


def run_stage(stage: Stage, settings: Settings, env: dict[str, str]) -> StageResult:
    result = StageResult(stage.name, stage.title, commands=[shlex.join(c) for c in stage.commands])
    log_path = settings.work / "logs" / f"{stage.name}.log"
    result.log = str(log_path)
    missing = [(path, maker) for path, maker in stage.needs if not (settings.work / path).exists()]
    if missing:
        result.error = "needs " + ", ".join(f"{path} (from {maker})" for path, maker in missing)
        return result
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sampler = MemorySampler(use_gpu=settings.on_gpu)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        for command in stage.commands:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            # Its own process group: a hung DDP job (one rank dead, the others waiting) is killed as a whole.
            process = subprocess.Popen(command, cwd=settings.work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            sampler.start(process.pid)
            try:
                result.exit_code = process.wait(timeout=max(1, settings.timeout_s - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                # `seed-lightning` prints every thread's stack on SIGUSR2: the log then says where it hung.
                os.killpg(process.pid, signal.SIGUSR2)
                time.sleep(5)
                os.killpg(process.pid, signal.SIGKILL)
                result.exit_code = process.wait()
                result.status = "timeout"
                result.error = f"killed after {settings.timeout_s} s; last error line: {last_error_line(log_path)}"
            finally:
                sampler.stop()
            if result.exit_code != 0:
                break
    result.wall_s = time.perf_counter() - started
    result.peak_memory = sampler.describe()
    if result.status != "timeout":
        result.status = "completed" if result.exit_code == 0 else "failed"
        if result.exit_code != 0:
            result.error = last_error_line(log_path)
    if stage.finish is not None:
        try:
            stage.finish(result)
        except Exception as error:  # a measurement problem must not lose the stage's result
            result.notes.append(f"measurement failed: {type(error).__name__}: {error}")
    return result


def remove_outputs(stages: list[Stage], work: Path) -> None:
    for stage in stages:
        for path in stage.cleans:
            target = work / path
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def host_description(settings: Settings) -> str:
    if settings.on_gpu and shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip().splitlines()
        return f"{len(names)} x {names[0]}" if names else "GPU (nvidia-smi listed none)"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def versions() -> str:
    import importlib.metadata

    parts = []
    for name in ("torch", "lightning", "transformers", "diffusers", "peft", "huggingface_hub"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} missing")
    return ", ".join(parts)


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog="bench/rehearsal.sh", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--scale", choices=sorted(SCALES), default="full",
                        help="full: the paper's model sizes (GPU); tiny: the same layouts and configs with tiny "
                             "widths (CPU tests)")
    parser.add_argument("--accelerator", choices=("gpu", "cpu"), default=None,
                        help="default: gpu when CUDA is available, else cpu")
    parser.add_argument("--devices", type=int, default=None, help="GPUs (default: all) or CPU processes (default 2)")
    parser.add_argument("--dir", default=os.environ.get("REHEARSAL_DIR", str(REPO / "rehearsal")),
                        help="work dir (default: $REHEARSAL_DIR or rehearsal/ in the repo)")
    parser.add_argument("--out", default=os.environ.get("REHEARSAL_OUT"),
                        help="where report.md / report.json / rehearsal-logs.tar.gz go ($REHEARSAL_OUT; default: --dir)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (later ones reuse earlier outputs)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per fit stage (default: per scale)")
    parser.add_argument("--timeout", type=int, default=480,
                        help="seconds after which a stage is killed (a DDP job whose rank died can hang)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of every stage")
    args = parser.parse_args(argv)
    import torch

    accelerator = args.accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count()
    devices = args.devices or (gpus if accelerator == "gpu" else 2)
    stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    work = Path(args.dir).resolve()
    sizes = SCALES[args.scale]
    return Settings(
        scale=args.scale, accelerator=accelerator, devices=devices, work=work,
        out=Path(args.out).resolve() if args.out else work, python=args.python, stages=stages,
        steps=args.steps or sizes.steps, timeout_s=args.timeout, sizes=sizes, all_gpus=devices == gpus,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    settings.work.mkdir(parents=True, exist_ok=True)
    notes: dict[str, list[str]] = {}
    stages = plan(settings, notes)
    overrides = {}
    mllm_config = effective("mllm", MLLM_CONFIGS)
    for stage in stages:
        if stage.overlay is not None:
            path = settings.work / "overrides" / f"{stage.name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(stage.overlay, sort_keys=False))
            overrides[stage.name] = flatten(stage.overlay) + callback_changes(mllm_config, stage.overlay)
    header = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": host_description(settings),
        "scale": settings.scale,
        "accelerator / devices": f"{settings.accelerator} / {settings.devices}",
        "steps per fit stage": settings.steps,
        "versions": versions(),
        "java": shutil.which("java") or "none (caption metrics off)",
        "work dir": str(settings.work),
    }
    print(f"rehearsal: {header['host']}, scale {settings.scale}, {settings.accelerator} x {settings.devices}, "
          f"work dir {settings.work}", flush=True)
    env = stage_env(settings)
    remove_outputs(stages, settings.work)
    results = []
    for stage in stages:
        print(f"[{datetime.datetime.now():%H:%M:%S}] {stage.name}: {stage.title}", flush=True)
        result = run_stage(stage, settings, env)
        result.notes = notes.get(stage.name, []) + result.notes
        results.append(result)
        wall = "" if result.wall_s is None else f" in {result.wall_s:.0f} s"
        print(f"    {result.status}{wall}" + (f": {result.error}" if result.error else ""), flush=True)
    report = write_report(settings.out, header, results, overrides)
    if settings.out != settings.work:
        with tarfile.open(settings.out / "rehearsal-logs.tar.gz", "w:gz") as archive:
            for name in ("logs", "overrides"):
                if (settings.work / name).is_dir():
                    archive.add(settings.work / name, arcname=name)
        if (settings.work / "generated.png").is_file():
            shutil.copy(settings.work / "generated.png", settings.out / "generated.png")
    print("\n" + format_table(results))
    print(f"\nreport: {report} (+ report.json); logs: {settings.work / 'logs'}")
    return 0 if all(r.status == "completed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
