#!/usr/bin/env bash
# `moco bench step` and the same MoCo step in PyTorch, side by side, 2 threads each.
# Usage: bench/step.sh [STEPS]    (needs torch and torchvision)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
cargo build --release -q -p moco-cli
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
printf '| model, input | moco-rs img/s | PyTorch img/s | ratio | moco-rs peak RSS | PyTorch peak RSS |\n|---|---|---|---|---|---|\n'
run() { # name, then the arguments of both step benchmarks
  local name=$1; shift
  ours=$(./target/release/moco bench step "$@" --json | tail -1)
  theirs=$(python3 bench/reference/bench_step.py "$@" --json | tail -1)
  python3 - "$ours" "$theirs" "$name" <<'PY'
import json, sys
o, t, name = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
print(f"| {name} | {o['images_per_s']:.1f} | {t['images_per_s']:.1f} | {o['images_per_s'] / t['images_per_s']:.3f} | {o['peak_rss_mb']:.0f} MB | {t['peak_rss_mb']:.0f} MB |")
PY
}
for cfg in "16 28 1" "16 32 3" "64 32 3"; do
  set -- $cfg
  run "resnet18-small w$1, ${2}x${2}x$3, batch 64, v1" --arch resnet18-small --width "$1" --image-size "$2" --channels "$3" --batch-size 64 --steps "$steps"
done
run "resnet50, 224x224x3, batch 32, K 65536, v2 (MLP head)" --arch resnet50 --width 64 --image-size 224 --channels 3 --batch-size 32 --queue-size 65536 --mlp --steps 3
