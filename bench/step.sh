#!/usr/bin/env bash
# `moco bench step` and the same MoCo step in PyTorch, side by side, 2 threads each.
# Usage: bench/step.sh [STEPS] [REPEATS]    (needs torch and torchvision)
# Each row: REPEATS (default 3) alternating runs of both sides, medians reported (the machine is
# noisy: one process's throughput can move by 30%); the 224x224 rows run once per side.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
repeats=${2:-3}
cargo build --release -q -p moco-cli
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
printf '| model, input | moco-rs img/s | PyTorch img/s | ratio | moco-rs peak RSS | PyTorch peak RSS |\n|---|---|---|---|---|---|\n'
run() { # repeats, name, then the arguments of both step benchmarks
  local reps=$1 name=$2; shift 2
  local ours=() theirs=()
  for _ in $(seq "$reps"); do
    ours+=("$(./target/release/moco bench step "$@" --json | tail -1)")
    theirs+=("$(python3 bench/reference/bench_step.py "$@" --json | tail -1)")
  done
  python3 - "$name" "${#ours[@]}" "${ours[@]}" "${theirs[@]}" <<'PY'
import json, statistics, sys
name, n = sys.argv[1], int(sys.argv[2])
o = [json.loads(x) for x in sys.argv[3 : 3 + n]]
t = [json.loads(x) for x in sys.argv[3 + n :]]
med = lambda rs, k: statistics.median(r[k] for r in rs)
oi, ti = med(o, "images_per_s"), med(t, "images_per_s")
print(f"| {name} | {oi:.1f} | {ti:.1f} | {oi / ti:.3f} | {med(o, 'peak_rss_mb'):.0f} MB | {med(t, 'peak_rss_mb'):.0f} MB |")
PY
}
for cfg in "16 28 1" "16 32 3" "64 32 3"; do
  set -- $cfg
  run "$repeats" "resnet18-small w$1, ${2}x${2}x$3, batch 64, v1" --arch resnet18-small --width "$1" --image-size "$2" --channels "$3" --batch-size 64 --steps "$steps"
done
run 1 "resnet18, 224x224x3, batch 32, K 65536, v2 (MLP head)" --arch resnet18 --width 64 --image-size 224 --channels 3 --batch-size 32 --queue-size 65536 --mlp --steps 3
run 1 "resnet50, 224x224x3, batch 32, K 65536, v2 (MLP head)" --arch resnet50 --width 64 --image-size 224 --channels 3 --batch-size 32 --queue-size 65536 --mlp --steps 3
