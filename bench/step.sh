#!/usr/bin/env bash
# `moco bench step` and the same MoCo step in PyTorch, side by side, 2 threads each.
# Usage: bench/step.sh [STEPS] [REPEATS]    (needs torch and torchvision)
# Each row: REPEATS (default 3) alternating runs of both sides, medians reported (the machine is
# noisy: one process's throughput can move by 30%); the 224x224 rows run once per side.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
repeats=${2:-3}
source bench/side_by_side.sh
for cfg in "16 28 1" "16 32 3" "64 32 3"; do
  set -- $cfg
  run "$repeats" "resnet18-small w$1, ${2}x${2}x$3, batch 64, v1" --arch resnet18-small --width "$1" --image-size "$2" --channels "$3" --batch-size 64 --steps "$steps"
done
run 1 "resnet18, 224x224x3, batch 32, K 65536, v2 (MLP head)" --arch resnet18 --width 64 --image-size 224 --channels 3 --batch-size 32 --queue-size 65536 --mlp --steps 3
run 1 "resnet50, 224x224x3, batch 32, K 65536, v2 (MLP head)" --arch resnet50 --width 64 --image-size 224 --channels 3 --batch-size 32 --queue-size 65536 --mlp --steps 3
