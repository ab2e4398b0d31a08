#!/usr/bin/env bash
# The CUDA checks, in two halves.
#
# Here (with Rust, no GPU):   scripts/gpu-check.sh --prepare
#   builds the CUDA binary (scripts/build-cuda.sh), strips and compresses it into
#   target/gpu/moco.gz (about 25 MB: small enough to travel with the working tree).
# There (a GPU, its driver, PyTorch with CUDA 13; no Rust):   scripts/gpu-check.sh
#   with target/gpu/moco.gz carried along. Finds the CUDA 13 runtime libraries of the PyTorch
#   environment (site-packages/nvidia/cu13/lib) instead of carrying them, then
#   1. `moco check-device --device cuda`: one MoCo v2 step on the GPU next to the same step on
#      the CPU (same seeded weights, queue and input): loss and every updated tensor within 1e-3,
#      for the small ResNet and a small ViT; then the same with `--dist nccl` (NCCL, from the PyTorch environment's nvidia/nccl/lib):
#      the step through NCCL's all-reduce / all-gather / broadcast in a group of one;
#      `--sync-bn`: a MoCo v3 step as two ranks sharing the GPU (TCP), SyncBN on CUDA's path,
#      against one CPU process on the whole batch;
#      with 2+ GPUs, a short `moco launch` data-parallel pretraining over all of them;
#   2. `moco bench step --device cuda` next to bench/reference/bench_step.py --device cuda:
#      resnet50 at 224x224 (batch 256, K 65536, v2 head) and the small ResNet-18 (width 64,
#      32x32, batch 256), each side's peak GPU memory sampled by nvidia-smi;
#   3. the same pair with --extract: resnet50's eval-mode forward at 224x224, batch 256.
# Everything is logged to target/gpu/gpu-check.log (and $OUT, when set, receives a copy).
# Budget: about 10 minutes; each step has its own timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  FEATURES=${FEATURES:-cuda,nccl} scripts/build-cuda.sh
  mkdir -p target/gpu
  strip -o target/gpu/moco "${CARGO_TARGET_DIR:-target/cuda}/release/moco"
  gzip -f target/gpu/moco
  ls -la target/gpu/moco.gz
  exit 0
fi

log=target/gpu/gpu-check.log
mkdir -p target/gpu
exec > >(tee "$log") 2>&1
if [ -n "${OUT:-}" ]; then
  trap 'cp "$log" "$OUT/" 2>/dev/null || true' EXIT
fi

bin=target/gpu/moco
if [ ! -x "$bin" ]; then
  [ -f "$bin.gz" ] || { echo "no $bin.gz: run scripts/gpu-check.sh --prepare on the build machine and carry target/gpu/moco.gz"; exit 1; }
  gunzip -c "$bin.gz" > "$bin"
  chmod +x "$bin"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
cu13=$(python3 -c 'import nvidia, os; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "cu13", "lib"))]' 2>/dev/null | head -1)
if [ -z "$cu13" ]; then
  echo "no nvidia/cu13/lib in this Python's site-packages: install PyTorch's CUDA 13 wheels"
  exit 1
fi
nccl=$(python3 -c 'import nvidia, os; [print(os.path.join(p, "nccl", "lib")) for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "nccl", "lib"))]' 2>/dev/null | head -1)
export LD_LIBRARY_PATH=$cu13${nccl:+:$nccl}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "CUDA libraries from $cu13; NCCL from ${nccl:-nowhere (no nvidia/nccl/lib)}"
"$bin" --version

echo "== 1. one MoCo step, CUDA vs CPU"
timeout 180 "$bin" check-device --device cuda --arch resnet18-small --width 16 --image-size 32 --batch-size 32
echo "== 1a. the same for a ViT (candle's ops on the GPU; the CPU side runs the fused kernels)"
timeout 120 "$bin" check-device --device cuda --arch vit-64x2h2 --image-size 32 --batch-size 32 ||
  echo "ViT check failed"
echo "== 1b. the same step through NCCL (a group of one process)"
timeout 120 "$bin" check-device --device cuda --dist nccl --arch resnet18-small --width 16 --image-size 32 --batch-size 32 ||
  echo "NCCL check failed"
echo "== 1c. SyncBN: one MoCo v3 step as two ranks sharing the GPU (TCP) vs one CPU process"
timeout 120 "$bin" check-device --device cuda --sync-bn --arch resnet18-small --width 16 --image-size 32 --batch-size 32 ||
  echo "SyncBN check failed"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ]; then
  echo "== 1d. data-parallel pretraining on $gpus GPUs (NCCL)"
  rm -rf target/gpu/ddp-run
  timeout 240 "$bin" launch --nproc-per-node "$gpus" -- --device cuda --batch-size $((64 * gpus)) \
    --max-steps 20 --log-every 5 --knn-every 0 --out target/gpu/ddp-run --quiet || echo "launch failed"
fi

echo "== 2. training step throughput, moco-rs vs PyTorch on this GPU"
# WHO COMMAND...: runs the command (its last 2 lines shown) while nvidia-smi samples the GPUs'
# used memory every 100 ms, and prints the largest sample: the two sides measured alike.
gpu_peak() {
  local who=$1 out samples smi
  shift
  out=$(mktemp)
  samples=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$samples" 2>/dev/null &
  smi=$!
  "$@" > "$out" 2>&1 || echo "$who: failed or timed out"
  kill "$smi" 2>/dev/null || true
  wait "$smi" 2>/dev/null || true
  tail -2 "$out"
  local peak
  peak=$(sort -n "$samples" | tail -1)
  echo "$who: peak GPU memory used ${peak:-?} MiB (nvidia-smi, every 100 ms)"
  rm -f "$out" "$samples"
}
bench() {
  echo "-- $*"
  gpu_peak moco-rs timeout 150 "$bin" bench step --device cuda "$@" --json
  gpu_peak PyTorch timeout 150 python3 bench/reference/bench_step.py --device cuda "$@" --json
}
bench --arch resnet18-small --width 64 --image-size 32 --channels 3 --batch-size 256 --steps 10
bench --arch resnet50 --width 64 --image-size 224 --channels 3 --batch-size 256 --queue-size 65536 --mlp --steps 5
echo "== 3. feature extraction (eval-mode forward of the frozen backbone), moco-rs vs PyTorch"
bench --arch resnet50 --width 64 --image-size 224 --channels 3 --batch-size 256 --extract --steps 5
echo "== done"
