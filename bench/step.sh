#!/usr/bin/env bash
# `moco bench step` and the same MoCo step in PyTorch, side by side, 2 threads each.
# Usage: bench/step.sh [STEPS]    (needs torch and torchvision)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
cargo build --release -q -p moco-cli
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
printf '| model, input, batch 64 | moco-rs img/s | PyTorch img/s | ratio | moco-rs peak RSS | PyTorch peak RSS |\n|---|---|---|---|---|---|\n'
for cfg in "resnet18-small 16 28 1" "resnet18-small 16 32 3" "resnet18-small 64 32 3"; do
  set -- $cfg
  args=(--arch "$1" --width "$2" --image-size "$3" --channels "$4" --batch-size 64 --steps "$steps" --json)
  ours=$(./target/release/moco bench step "${args[@]}" | tail -1)
  theirs=$(python3 bench/reference/bench_step.py "${args[@]}" | tail -1)
  python3 - "$ours" "$theirs" "$*" <<'PY'
import json, sys
o, t, name = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3].split()
print(f"| {name[0]} w{name[1]}, {name[2]}x{name[2]}x{name[3]} | {o['images_per_s']:.1f} | {t['images_per_s']:.1f} | {o['images_per_s'] / t['images_per_s']:.3f} | {o['peak_rss_mb']:.0f} MB | {t['peak_rss_mb']:.0f} MB |")
PY
done
