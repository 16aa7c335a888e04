import sys
from pathlib import Path

import pytest

from bench.rehearsal import run
from bench.rehearsal.run import Settings, Stage

# What the rehearsal may change in a paper config on GPU: data paths, step counts (and logging every step, to
# measure them), batch sizes; the model tokenizer path only while the configs do not chain (issue 10, item 3).
GPU_KEYS = {"trainer.max_steps", "trainer.val_check_interval", "trainer.log_every_n_steps", "data.batch_size",
            "data.train", "data.samples_per_epoch", "model.tokenizer"}
CPU_KEYS = {"trainer.accelerator", "trainer.devices", "model.compile", "data.num_workers"}


def settings(tmp_path: Path, accelerator: str = "gpu", scale: str = "full") -> Settings:
    return Settings(scale=scale, accelerator=accelerator, devices=2, work=tmp_path, out=tmp_path,
                    python=sys.executable, stages=list(run.STAGES), steps=8, timeout_s=30, sizes=run.SCALES[scale])


@pytest.mark.slow  # parses the paper configs with the CLI
@pytest.mark.parametrize("accelerator, allowed", [("gpu", GPU_KEYS), ("cpu", GPU_KEYS | CPU_KEYS)])
def test_overlays_change_only_paths_steps_and_batch_sizes(tmp_path, accelerator, allowed):
    stages = run.plan(settings(tmp_path, accelerator), {})
    mllm_config = run.effective("mllm", run.MLLM_CONFIGS)
    overlays = {stage.name: stage.overlay for stage in stages if stage.overlay is not None}
    assert sorted(overlays) == ["evaluate", "mllm", "stage1", "stage2"]
    for overlay in overlays.values():
        keys = {line.split(":")[0] for line in run.flatten(overlay)}
        assert keys <= allowed
    assert run.callback_changes(mllm_config, overlays["mllm"]) == ["trainer.callbacks[CLIPScoreCallback].num_images: 8"]


@pytest.mark.slow  # parses the paper MLLM config with the CLI
def test_without_java_caption_metrics_are_switched_off_not_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(run.shutil, "which", lambda name: None)
    config = run.effective("mllm", run.MLLM_CONFIGS)
    notes = []
    overlay = run.mllm_overlay(settings(tmp_path), config, notes)
    assert "trainer.callbacks[CaptionMetricsCallback].score: False" in run.callback_changes(config, overlay)
    assert "no java" in notes[0]


def test_a_stage_whose_input_is_missing_is_skipped_and_says_which(tmp_path):
    stage = Stage("mllm", "MLLM", [["false"]], needs=[(Path("data/tokens"), "extract")])
    result = run.run_stage(stage, settings(tmp_path, "cpu"), env={})
    assert (result.status, result.exit_code, result.error) == ("skipped", None, "needs data/tokens (from extract)")


def test_a_failing_stage_reports_its_exit_code_and_error_and_stops_its_commands(tmp_path):
    fail = [sys.executable, "-c", "import sys; print('ValueError: bad batch', file=sys.stderr); sys.exit(3)"]
    stage = Stage("x", "x", [fail, [sys.executable, "-c", "open('ran', 'w')"]])
    result = run.run_stage(stage, settings(tmp_path, "cpu"), env={})
    assert (result.status, result.exit_code, result.error) == ("failed", 3, "ValueError: bad batch")
    assert not (tmp_path / "ran").exists() and result.wall_s > 0


def test_a_hanging_stage_is_killed_with_its_children(tmp_path):
    hang = ["bash", "-c", "sleep 60 & echo $! > child; wait"]
    config = settings(tmp_path, "cpu")
    config.timeout_s = 2
    result = run.run_stage(Stage("hang", "hang", [hang]), config, env={})
    assert result.status == "timeout" and result.wall_s < 10
    child = int((tmp_path / "child").read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_outputs_of_the_stages_to_run_are_removed_before_any_runs(tmp_path):
    """A stage whose maker fails must not find what an earlier rehearsal left (it is skipped instead)."""
    (tmp_path / "checkpoints" / "export").mkdir(parents=True)
    (tmp_path / "kept").mkdir()
    stages = [Stage("make", "make", [["false"]], cleans=["checkpoints/export"]),
              Stage("use", "use", [["true"]], needs=[(Path("checkpoints/export"), "make")])]
    run.remove_outputs(stages, tmp_path)
    results = [run.run_stage(stage, settings(tmp_path, "cpu"), env={}) for stage in stages]
    assert [r.status for r in results] == ["failed", "skipped"] and (tmp_path / "kept").is_dir()
