#!/usr/bin/env bash
# Pre-flight for a real run: the paper configs end to end (stage 1, stage 2, extract-tokens, MLLM fit with its
# validation callbacks, evaluate, text-to-image) on random full-size weights in the exact hub layouts, on every
# GPU of this host, offline. About 12 minutes on 2 H200s. Report: $REHEARSAL_OUT (default: the work dir).
#   bash bench/rehearsal.sh                                   # full size, every GPU
#   bash bench/rehearsal.sh --scale tiny --accelerator cpu --devices 2   # the same path, tiny widths, on CPU
#   bash bench/rehearsal.sh --stages mllm,evaluate,generate   # rerun some stages on the outputs of earlier ones
# `bash bench/rehearsal.sh --help` lists every option. What it needs that a GPU image may lack is installed from
# the repo: wheels in .whl/ (into /tmp/rehearsal-site), a JRE .deb in .jre/ (unpacked into /tmp/rehearsal-jre).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=python3; fi

# Packages the GPU image lacks, from carried wheels (no index: the machine is offline).
if ! $PY -c "import jsonargparse, webdataset, diffusers, pycocoevalcap" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "rehearsal: installing .whl/*.whl into /tmp/rehearsal-site"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/rehearsal-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/rehearsal-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "rehearsal: jsonargparse, webdataset, diffusers or pycocoevalcap missing and no .whl/ to install from" >&2
  fi
fi
# Java for the caption metrics (pycocoevalcap's PTB tokenizer): a carried JRE .deb when none is installed.
if ! command -v java >/dev/null; then
  deb=$(compgen -G ".jre/*jre*.deb" | head -n 1)
  if [[ -n $deb ]]; then
    jre=/tmp/rehearsal-jre
    mkdir -p $jre && dpkg -x "$deb" $jre
    # The package links its config files to absolute /etc/java-17-openjdk/... paths that only an install
    # creates: point them at the unpacked copies.
    find $jre -type l | while read -r link; do
      target=$(readlink "$link")
      if [[ $target == /* && -e $jre$target ]]; then ln -sfn "$jre$target" "$link"; fi
    done
    java=$(find $jre -type f -name java -path '*/bin/*' | head -n 1)
    if [[ -n $java ]]; then
      export PATH=$(dirname "$java"):$PATH
      echo "rehearsal: java from $deb ($(java -version 2>&1 | head -n 1))"
    else
      echo "rehearsal: no bin/java in $deb: caption metrics stay off" >&2
    fi
  fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec $PY -m bench.rehearsal.run --python "$PY" "$@"
