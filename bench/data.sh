#!/usr/bin/env bash
# `moco bench data` and the torchvision loader side by side, same data, same workers.
# Usage: [PRESET=eval] bench/data.sh [WORKERS] [IMAGES] [DATASET]
#   DATASET folder (default): the v2 two-crop pipeline at 224x224 on a folder of ImageNet-sized
#     JPEGs (BENCH_DIR, made by bench/make_folder.py; needs scikit-image); PRESET=eval: the
#     evaluation transform (Resize 256, CenterCrop 224, one view) instead;
#   DATASET fashion-mnist: the cifar preset at 28x28 on the idx files (BENCH_DIR, default
#     /usr/share/datasets/fashion-mnist).
# Needs torch and torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-2}
images=${2:-1024}
dataset=${3:-folder}
cargo build --release -q -p moco-cli
# The same flags for both sides.
if [ "$dataset" = folder ]; then
  dir=${BENCH_DIR:-/tmp/moco-bench-folder}
  [ -d "$dir/train" ] || python3 bench/make_folder.py "$dir" "$images"
  args=(--dataset folder --data-dir "$dir" --preset "${PRESET:-v2}" --image-size 224)
else
  args=(--dataset "$dataset" --data-dir "${BENCH_DIR:-/usr/share/datasets/fashion-mnist}" --preset cifar)
fi
args+=(--workers "$workers" --images "$images" --json)
ours=$(./target/release/moco bench data "${args[@]}" | tail -1)
theirs=$(python3 bench/reference/bench_data.py "${args[@]}" | tail -1)
python3 - "$ours" "$theirs" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"moco-rs      {o['images_per_s']:8.1f} images/s")
print(f"torchvision  {t['images_per_s']:8.1f} images/s")
print(f"ratio        {o['images_per_s'] / t['images_per_s']:8.2f}x")
PY
