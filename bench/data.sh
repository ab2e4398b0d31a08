#!/usr/bin/env bash
# `moco bench data` and the torchvision loader side by side, same folder, same workers.
# Usage: bench/data.sh [WORKERS] [IMAGES]   (needs torch, torchvision, scikit-image for the folder)
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-2}
images=${2:-1024}
dir=${BENCH_DIR:-/tmp/moco-bench-folder}
[ -d "$dir/train" ] || python3 bench/make_folder.py "$dir" "$images"
cargo build --release -q -p moco-cli
ours=$(./target/release/moco bench data --dataset folder --data-dir "$dir" --preset v2 --image-size 224 --workers "$workers" --images "$images" --json | tail -1)
theirs=$(python3 bench/reference/bench_data.py --data-dir "$dir" --preset v2 --image-size 224 --workers "$workers" --images "$images" --json | tail -1)
python3 - "$ours" "$theirs" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"moco-rs      {o['images_per_s']:8.1f} images/s")
print(f"torchvision  {t['images_per_s']:8.1f} images/s")
print(f"ratio        {o['images_per_s'] / t['images_per_s']:8.2f}x")
PY
