#!/usr/bin/env bash
# What training from an int8, rank-256 cache costs in probe scores, on the CPU demo, three seeds.
# Per seed: the demo trained live; from a cache of 28 views an image (the crops the live run
# draws in its 150 steps of 16 over 87 images, so only the compression differs); and from the
# default 4 views an image (compression and view reuse together). Then one comparison of all.
#   bash benchmarks/cache_accuracy.sh [OUT]        (OUT default runs/cache_accuracy; ~55 min on 2 cores)
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
  for views in 28 4; do
    name=cache${views}_s$s
    C="--set name=$name --set output_dir=$OUT/{name} --set train.seed=$s --set cache.dtype=int8 --set cache.rank=256
       --set cache.epochs=$views"  # the cache goes in <run>/cache
    $LK cache $RECIPE --no-progress $C
    $LK train $RECIPE --no-progress $C --set teachers_from=cache $PROBES --probe
    runs+=("$OUT/$name") labels+=("cache$views-seed$s")
  done
done
$LK compare "${runs[@]}" --labels "$(IFS=,; echo "${labels[*]}")" --out "$OUT/compare"
