#!/usr/bin/env bash
# Every GPU measurement of difflab against diffusers, in one run of at most 8 minutes on a
# machine with no network. diffusers comes from wheels brought along in .whl/ (see bench/README.md).
# Prints a short table last; full logs go to $OUT (or bench/out).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    echo "diffusers is not installed and no wheels are in .whl/: see bench/README.md"; exit 1
  fi
fi
export PYTHONPATH=$PWD/src:$PWD/bench:${PYTHONPATH:-} PYTHONUNBUFFERED=1
logs=${OUT:-bench/out}; mkdir -p "$logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$logs/gpu.txt"
timeout 270 python3 bench/train_speed.py --device cuda 2>&1 | grep -v "kept in float32" | tee "$logs/train.txt"
timeout 190 python3 bench/sample_speed.py --device cuda 2>&1 | grep -v "kept in float32" | tee "$logs/sample.txt"
echo "=== summary ($(head -1 "$logs/gpu.txt"))"
grep -hE "img/s|ratio=|GFLOP" "$logs/train.txt" "$logs/sample.txt"
