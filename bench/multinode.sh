#!/usr/bin/env bash
# Stage 1 (tiny config) on a 2-GPU host as 2 nodes x 1 GPU (two torchrun agents with node ranks 0 and 1, one GPU
# each) and as 1 node x 2 GPUs: per-step losses side by side, whether they are equal, and a checkpoint of the
# 1 x 2 run resumed as 2 x 1 (bench/multinode.py). About 2 minutes; exit status 0 when every comparison holds.
#   bash bench/multinode.sh [--steps 6 --save-at 3 --out DIR]
# Needs data/models/{tiny-blip2,bert-tokenizer} and data/synthetic/shards/train-000000.tar (`make data`) and the
# packages of requirements.txt; on a GPU image without jsonargparse/webdataset, install the wheels of .whl/ first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
if ! $PY -c "import jsonargparse, webdataset, lightning, tensorboard" 2>/dev/null; then
  echo "multinode: jsonargparse, webdataset, lightning or tensorboard missing: pip install them (or .whl/*.whl)" >&2
  exit 2
fi
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
if (( GPUS < 2 )); then echo "multinode: needs 2 GPUs, nvidia-smi lists $GPUS" >&2; exit 2; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast here
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 540 $PY -m bench.multinode --accelerator gpu "$@"
