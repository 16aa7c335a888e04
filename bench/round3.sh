#!/usr/bin/env bash
# Issue 13, speed round two, on one H200 in one call of about 9 minutes (BENCH_OUT=$OUT bash bench/round3.sh),
# carrying .whl/, data/models/{bert-tokenizer,tiny-opt,tiny-blip2} and data/synthetic/shards. Most important first;
# each part is cut off by its own time limit (seconds, overridable) rather than by the device's:
#   1. stage 1 with torchao float8 + compile for the frozen ViT-g, the default and THE bf16 baseline (same process);
#   2. what FP8 changes on retrieval: one stage-1 model trained ~1 min on the synthetic shards, val R@K with its
#      frozen ViT in bf16 and in FP8;
#   3. stage 2 with L_gen at the paper's 2048 images/GPU: cached towers vs THE baseline recomputing them (target 20x).
# Results: RESULT lines on stdout and $BENCH_OUT/results.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
cd bench
timeout ${STAGE1_LIMIT:-210} $PY stage1.py --batch 256 --steps 6 --warmup 2 --variants torchao-fp8 default \
  || echo "FAILED or cut: stage1"
timeout ${RETRIEVAL_LIMIT:-140} $PY fp8_retrieval.py --batch 256 --train-seconds ${TRAIN_SECONDS:-65} \
  || echo "FAILED or cut: fp8_retrieval"
timeout ${STAGE2_LIMIT:-170} $PY stage2.py --gen --batch 2048 --batches 4 --epochs 2 --compile \
  || echo "FAILED or cut: stage2 with L_gen"
