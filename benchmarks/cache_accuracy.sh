#!/usr/bin/env bash
# What training from an int8, rank-256 cache costs in probe scores, on the CPU demo, three seeds.
# Per seed: the demo trained live, and from a cache of 28 views an image: the crops the live run
# draws in its 150 steps of 16 over 87 images, so that only the compression differs (a cache of
# fewer views also repeats crops). Then one comparison of all, with the spread over the seeds.
#   bash benchmarks/cache_accuracy.sh [OUT]        (OUT default runs/cache_accuracy; ~40 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cache_accuracy}
LK=${LK:-.venv/bin/lowres-kd}
RECIPE=recipes/demo_cpu.yaml
PROBES="--set probe.probes=[linear,knn,edges]"
runs=() labels=()
for s in 0 1 2; do
  $LK train $RECIPE --no-progress --set name=live_s$s --set "output_dir=$OUT/{name}" --set train.seed=$s $PROBES --probe
  runs+=("$OUT/live_s$s") labels+=("live-seed$s")
  C="--set name=cache28_s$s --set output_dir=$OUT/{name} --set train.seed=$s --set cache.dtype=int8
     --set cache.rank=256 --set cache.epochs=28"  # the cache goes in <run>/cache
  $LK cache $RECIPE --no-progress $C
  $LK train $RECIPE --no-progress $C --set teachers_from=cache $PROBES --probe
  runs+=("$OUT/cache28_s$s") labels+=("cache28-seed$s")
done
$LK compare "${runs[@]}" --labels "$(IFS=,; echo "${labels[*]}")" --out "$OUT/compare"
