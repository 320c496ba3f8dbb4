#!/usr/bin/env bash
# Lent-GPU check of the low-memory teachers (bitsandbytes carried as a wheel in .gpuwhl):
# CUDA offload tests, quantized teachers inside a CUDA training run, and the teacher benchmark.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuwhl/*.whl
export PYTHONPATH="$PWD:/tmp/site"
{
  echo "== $(date -u) git ${LOWRES_KD_GIT_SHA:-?}"
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch, bitsandbytes; print('torch', torch.__version__, 'bitsandbytes', bitsandbytes.__version__)"
  echo "== gpu tests"
  timeout "${TEST_SECONDS:-120}" python3 -m pytest -q -p no:cacheprovider tests/lowmem/test_offload.py tests/lowmem/test_quantize.py tests/training/test_low_memory_teachers.py
  echo "== teacher benchmark"
  timeout "${BENCH_SECONDS:-150}" python3 benchmarks/bench_teachers.py --device cuda --out "$OUT" \
    --teachers vit_small_patch16_224 vit_base_patch16_224 vit_large_patch16_224 mobilenet_v2 --max-seconds "${BENCH_BUDGET:-110}"
  echo "== done $(date -u)"
} 2>&1 | tee "$OUT/log.txt"
