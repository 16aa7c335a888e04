"""bench/stage1.py end to end in its tiny CPU form, so that a GPU call does not fail on a bug."""

import pytest


@pytest.mark.slow
def test_stage1_bench_reports_the_baseline_each_variant_and_what_fp8_changes(run_bench, fp8_on_the_cpu, monkeypatch):
    import stage1

    monkeypatch.setitem(stage1.VARIANTS, "torchao-fp8", {"vision_fp8": True})  # compiling on the CPU takes minutes
    records = run_bench("stage1", "--batch", "4", "--steps", "1", "--warmup", "1")
    names = [record["name"] for record in records]
    assert not [name for name in names if "FAILED" in name]
    baseline, fp8, default, bound = records[1:]
    assert baseline["name"].startswith("THE baseline") and baseline["images_per_sec"] > 0
    assert "torchao-fp8" in fp8["name"] and "default" in default["name"] and bound["name"].startswith("bound")
    for project in (fp8, default):
        assert project["ratio_to_baseline"] == pytest.approx(project["images_per_sec"] / baseline["images_per_sec"])
        assert "ratio_to_fp32_frozen_baseline" not in project
    assert fp8["fp8_layers"] == 4 * 3 and fp8_on_the_cpu.quantized >= fp8["fp8_layers"]  # qkv, proj, fc1, fc2 x 3
    assert 0.9 < fp8["fp8_vs_bf16_itc_image_features_mean_cos"] < 1
    assert "fp8_layers" not in default
