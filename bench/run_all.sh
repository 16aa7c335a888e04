#!/usr/bin/env bash
# GPU benchmarks. Results: RESULT lines on stdout and $BENCH_OUT/results.jsonl (default ./bench_out).
#   bash bench/run_all.sh            # everything (about 12 min on one H100)
#   bash bench/run_all.sh tokenizer  # data pipeline + stage 1 + stage 2
#   bash bench/run_all.sh mllm       # MLLM only
set -uo pipefail
cd "$(dirname "$0")/.."
export BENCH_OUT=${BENCH_OUT:-$PWD/bench_out} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$BENCH_OUT"
PY=${PYTHON:-python3}
PART=${1:-all}
# GPU images often ship pytorch-lightning but not the `lightning` package: install the carried wheel.
$PY -c "import lightning" 2>/dev/null || $PY -m pip install -q --no-deps --no-index .whl/lightning-*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cd bench
if [[ $PART == all || $PART == tokenizer ]]; then
  $PY stage1.py --batch 256 64 --steps 10 || echo "FAILED stage1"
  $PY stage2.py --batch 256 --batches 16 --epochs 3 || echo "FAILED stage2"
  $PY data_pipeline.py --workers 1 4 8 16 || echo "FAILED data_pipeline"
fi
if [[ $PART == all || $PART == mllm ]]; then
  $PY mllm.py --samples 256 --steps 8 --max-length 256 1024 || echo "FAILED mllm"
fi
