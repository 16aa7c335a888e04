"""bench/fp8_retrieval.py end to end in its tiny CPU form (tiny-blip2, synthetic shards, torchao's float8 as
`fake_torchao` rounds it)."""

import pytest

RETRIEVAL_KEYS = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "mean_R")


@pytest.mark.slow
def test_retrieval_is_measured_with_the_same_trained_weights_in_bf16_and_fp8(run_bench, fp8_on_the_cpu):
    records = run_bench("fp8_retrieval", "--batch", "16", "--steps", "3", "--workers", "0")
    bf16, fp8 = records
    assert bf16["name"].endswith("bf16") and bf16["train_steps"] == 3 and bf16["val_images"] == 256
    assert "float8" in fp8["name"] and fp8["fp8_layers"] == 4 * 3 and fp8["val_images"] == 256
    for key in RETRIEVAL_KEYS:
        assert 0 <= bf16[key] <= 100 and 0 <= fp8[key] <= 100
        assert fp8[f"{key}_minus_bf16"] == pytest.approx(fp8[key] - bf16[key])
    # the rounded weights change the features a little, not the model
    assert 0.9 < fp8["fp8_vs_bf16_val_image_features_mean_cos"] < 1
