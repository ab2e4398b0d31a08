#!/usr/bin/env bash
# Feature extraction (the frozen backbone's eval-mode forward: what `moco knn`, `linear-eval`,
# `extract` and the kNN monitor run per batch): `moco bench step --extract` next to
# `bench_step.py --extract` (torch.no_grad, model.eval()), 2 threads each, random input.
# Usage: bench/extract.sh [STEPS] [REPEATS]    (needs torch, torchvision, timm==0.4.12)
# Each row: REPEATS (default 3) alternating runs of both sides, medians reported.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
repeats=${2:-3}
source bench/side_by_side.sh
x=(--extract --steps "$steps")
for cfg in "16 28 1" "16 32 3" "64 32 3"; do
  set -- $cfg
  run "$repeats" "resnet18-small w$1, ${2}x${2}x$3, batch 256" --arch resnet18-small --width "$1" --image-size "$2" --channels "$3" --batch-size 256 "${x[@]}"
done
run "$repeats" "resnet18, 224x224x3, batch 64" --arch resnet18 --width 64 --image-size 224 --batch-size 64 "${x[@]}"
run "$repeats" "resnet50, 224x224x3, batch 64" --arch resnet50 --width 64 --image-size 224 --batch-size 64 "${x[@]}"
run "$repeats" "vit-192x6h3, 4x4 patches of 32x32x3, batch 256" --arch vit-192x6h3 --patch-size 4 --image-size 32 --batch-size 256 "${x[@]}"
run "$repeats" "vit_small, 224x224x3, batch 64" --arch vit_small --image-size 224 --batch-size 64 "${x[@]}"
