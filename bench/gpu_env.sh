# Sourced by the GPU bench scripts from the repo root: environment, the packages GPU images lack (from the carried
# .whl/ wheels: the machine is offline), and the card. Sets PY.
export BENCH_OUT=${BENCH_OUT:-$PWD/bench_out} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$BENCH_OUT"
PY=${PYTHON:-python3}
# GPU images often ship pytorch-lightning but not the `lightning` package, nor torchao (FP8), braceexpand (the shard
# loader) or webdataset (devkit.synthetic, which bench/rehearsal's CLIP vocabulary uses).
for package in lightning torchao braceexpand webdataset; do
  $PY -c "import $package" 2>/dev/null || $PY -m pip install -q --no-deps --no-index .whl/$package-*.whl
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
