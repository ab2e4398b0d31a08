#!/usr/bin/env bash
# The CUDA checks, in two halves.
#
# Here (with Rust, no GPU):   scripts/gpu-check.sh --prepare
#   builds the CUDA binaries (scripts/build-cuda.sh): `cuda,nccl` and `cuda,cudnn,nccl`, strips
#   and compresses them into target/gpu/moco.xz and target/gpu/moco-cudnn.xz (about 14 MB each:
#   small enough to travel with the working tree; CUDNN=0 skips the second).
# There (a GPU, its driver, PyTorch with CUDA 13; no Rust):   scripts/gpu-check.sh
#   with target/gpu carried along. Finds the CUDA 13 runtime libraries of the PyTorch
#   environment (site-packages/nvidia/*/lib: cu13, nccl, cudnn) instead of carrying them, then,
#   for each binary in BINARIES (default "moco-cudnn moco", those carried):
#   1. `moco check-device --device cuda`: one MoCo v2 step on the GPU next to the same step on
#      the CPU (same seeded weights, queue and input): loss and every updated tensor within 1e-3,
#      for the small ResNet, resnet50 at 64x64 and a small ViT; then the same with
#      `--dist nccl`: the step through NCCL's all-reduce / all-gather / broadcast in a group of
#      one; `--sync-bn`: a MoCo v3 step as two ranks sharing the GPU (TCP), SyncBN on CUDA's
#      path, against one CPU process on the whole batch; with 2+ GPUs, a short `moco launch`
#      data-parallel pretraining over all of them;
#   2. the main job on CUDA with the first binary: `moco pretrain` (the default run), `moco knn`,
#      `moco linear-eval`, and the pretraining killed after its first checkpoint and resumed;
#   3. `moco bench step --device cuda` (full float32 and --tf32; --phases and --profile, the
#      time per op class, for resnet50) next to
#      bench/reference/bench_step.py --device cuda (PyTorch's default, TF32 convolutions, and
#      --fp32, with --profile: torch.profiler's split in the same classes, for resnet50):
#      resnet50 at 224x224 (batch 256, K 65536, v2 head) and the small ResNet-18
#      (width 64, 32x32, batch 256), each side's peak GPU memory sampled by nvidia-smi;
#   4. the same pairs for resnet50's eval-mode forward at 224x224, batch 256 (--extract);
#   5. (the cuDNN binary) MOCO_CUDNN_BN=1, BatchNorm's training mode on cuDNN (off by default,
#      not yet run on a GPU): the small ResNet and resnet50 checks of 1, then resnet50's step
#      of 3 (float32 with --phases, and --tf32), to read next to the step of 3;
#   0. (with the first binary) MOCO_CUDA_KERNELS=1, moco-rs's fused CUDA kernels
#      (BatchNorm training and evaluation with ReLU/add/downsampling pair, the stem's max pool;
#      off by default, not yet run on a GPU): the small ResNet and resnet50 checks of 1, then the
#      step and extraction benchmarks of 3 and 4 for moco-rs with the kernels on;
#   6. (only when asked for) the main job of 2 twice, uninterrupted, and how many tensors of the
#      two last checkpoints are equal: whether a GPU run repeats itself at all (2 compares the
#      killed-and-resumed run with the uninterrupted one the same way).
# GPU_CHECK_STEPS (default "kernels checks bn bench e2e"; add "repeat" for 6) picks the
# sections; they run in the order 1, 0, 5, 2, 6, 3-4.
# Everything is logged to target/gpu/gpu-check.log (and $OUT, when set, receives a copy).
# Budget: GPU_CHECK_BUDGET seconds in all (default 540, under the 10 minutes one device call may
# run); each step has its own timeout, cut to what is left, and a step that would start with
# under 15 s left is skipped. Without section 5 the script ran in about 5 minutes on an H200
# (bench/results/).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p target/gpu
  pack() { # FEATURES NAME: builds with FEATURES, keeps target/gpu/NAME.xz
    FEATURES=$1 scripts/build-cuda.sh
    strip -o "target/gpu/$2" "${CARGO_TARGET_DIR:-target/cuda}/release/moco"
    xz -T0 -9 -f "target/gpu/$2"
  }
  [ "${CUDNN:-1}" = 0 ] || pack cuda,cudnn,nccl moco-cudnn
  pack cuda,nccl moco # last: target/cuda/release/moco stays the plain CUDA build
  ls -la target/gpu/*.xz
  exit 0
fi

mkdir -p target/gpu
log=target/gpu/gpu-check.log
exec > >(tee "$log" ${OUT:+"$OUT/gpu-check.log"}) 2>&1

export RUST_BACKTRACE=0 # the binary is stripped: a backtrace would show nothing
budget=${GPU_CHECK_BUDGET:-540}
# MAX COMMAND...: runs COMMAND under `timeout`, MAX seconds or what is left of the budget.
within() {
  local max=$1 left=$((budget - SECONDS - 5))
  shift
  if [ "$left" -lt "$max" ]; then max=$left; fi
  if [ "$max" -lt 15 ]; then
    echo "skipped, ${SECONDS}s of the ${budget}s budget spent: $*"
    return 1
  fi
  timeout "$max" "$@"
}
# NAME: target/gpu/NAME, unpacked from NAME.xz (Python's lzma: no xz needed there).
unpack() {
  local bin=target/gpu/$1
  if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$bin.xz" "$bin"
    chmod +x "$bin"
  fi
  [ -x "$bin" ]
}
# The binaries to check: BINARIES (default "moco-cudnn moco"), those carried.
bins=()
for name in ${BINARIES:-moco-cudnn moco}; do
  if unpack "$name"; then bins+=("target/gpu/$name"); fi
done
if [ ${#bins[@]} = 0 ]; then
  echo "no target/gpu/moco*.xz: run scripts/gpu-check.sh --prepare on the build machine and carry target/gpu"
  exit 1
fi
bin=${bins[0]}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# The PyTorch environment's library folders: site-packages/nvidia/*/lib (cu13 holds the CUDA
# runtime and cuBLAS; cuRAND, NCCL and cuDNN may have their own).
libs=$(python3 -c 'import nvidia, glob, os; print(":".join(sorted(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib")))))' 2>/dev/null || true)
case ":$libs:" in
  *"/cu13/lib:"*) ;;
  *) echo "no nvidia/cu13/lib in this Python's site-packages: install PyTorch's CUDA 13 wheels"; exit 1 ;;
esac
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The driver's libcuda.so.1: where the loader finds it, else the usual driver folders.
if ! ldconfig -p | grep -q 'libcuda\.so\.1'; then
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
    if [ -e "$d/libcuda.so.1" ]; then export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$d; fi
  done
fi
echo "libraries from $libs"
for b in "${bins[@]}"; do
  if ldd "$b" | grep 'not found'; then
    echo "$b: libraries not found (above); LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    exit 1
  fi
done
"$bin" --version
python3 -c 'import torch; print("PyTorch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'

steps=" ${GPU_CHECK_STEPS:-kernels checks bn bench e2e} "
small=(--arch resnet18-small --width 16 --image-size 32 --batch-size 32)
[[ $steps == *" checks "* ]] && for b in "${bins[@]}"; do
  echo "== 1. $b: one MoCo step, CUDA vs CPU"
  within 90 "$b" check-device --device cuda "${small[@]}" || echo "CUDA check failed"
  echo "== 1a. the same for resnet50 (bottlenecks, the 7x7 stride-2 stem, max pool) at 64x64"
  within 90 "$b" check-device --device cuda --arch resnet50 --width 16 --image-size 64 --batch-size 16 ||
    echo "resnet50 check failed"
  echo "== 1b. the same for a ViT (candle's ops on the GPU; the CPU side runs the fused kernels)"
  within 60 "$b" check-device --device cuda --arch vit-64x2h2 --image-size 32 --batch-size 32 ||
    echo "ViT check failed"
  echo "== 1c. the same step through NCCL (a group of one process)"
  within 60 "$b" check-device --device cuda --dist nccl "${small[@]}" || echo "NCCL check failed"
  echo "== 1d. SyncBN: one MoCo v3 step as two ranks sharing the GPU (TCP) vs one CPU process"
  within 60 "$b" check-device --device cuda --sync-bn --width 4 --image-size 16 --batch-size 8 ||
    echo "SyncBN check failed"
  # At this size two CPU ranks differ from one CPU process by 3.75e-3 too (docs/gpu.md).
  within 60 "$b" check-device --device cuda --sync-bn "${small[@]}" || echo "SyncBN check failed (16 wide)"
done
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ] && [[ $steps == *" checks "* ]]; then
  echo "== 1e. data-parallel pretraining on $gpus GPUs (NCCL)"
  rm -rf target/gpu/ddp-run
  within 240 "$bin" launch --nproc-per-node "$gpus" -- --device cuda --batch-size $((64 * gpus)) \
    --max-steps 20 --log-every 5 --knn-every 0 --out target/gpu/ddp-run --quiet || echo "launch failed"
fi

# WHO COMMAND...: runs the command (its last 3 lines shown: --phases adds one) while nvidia-smi samples the GPUs'
# used memory every 100 ms, and prints the largest sample: the two sides measured alike.
gpu_peak() {
  local who=$1 out samples smi
  shift
  out=$(mktemp)
  samples=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$samples" 2>/dev/null &
  smi=$!
  "$@" > "$out" 2>&1 || echo "$who: failed, timed out or skipped"
  kill "$smi" 2>/dev/null || true
  wait "$smi" 2>/dev/null || true
  tail -3 "$out"
  local peak
  peak=$(sort -n "$samples" | tail -1)
  echo "$who: peak GPU memory used ${peak:-?} MiB (nvidia-smi, every 100 ms)"
  rm -f "$out" "$samples"
}
# Each binary in full float32 and with --tf32, then PyTorch by default (TF32 convolutions) and
# with --fp32, on the same flags.
bench() {
  echo "-- $*"
  local b
  for b in "${bins[@]}"; do
    gpu_peak "moco-rs ($b)" within 150 "$b" bench step --device cuda "$@" ${PHASES:+--phases --profile} --json
    gpu_peak "moco-rs ($b) --tf32" within 150 "$b" bench step --device cuda "$@" --tf32 --json
  done
  gpu_peak PyTorch within 120 python3 bench/reference/bench_step.py --device cuda "$@" --json
  gpu_peak "PyTorch --fp32" within 120 python3 bench/reference/bench_step.py --device cuda "$@" --fp32 ${PHASES:+--profile} --json
}
r50=(--arch resnet50 --width 64 --image-size 224 --channels 3 --batch-size 256)
# RUN_A RUN_B: how many tensors of the two runs' last checkpoints are equal to the bit.
same_run() {
  python3 - "$1/checkpoint-last.safetensors" "$2/checkpoint-last.safetensors" <<'PY' || true
import json, struct, sys
def tensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return {k: raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]] for k, v in header.items()}
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
same = sum(a[k] == b.get(k) for k in a)
print(f"last checkpoints: {same} of {len(a)} tensors equal to the bit ({sys.argv[1]} vs {sys.argv[2]})")
PY
}
if [[ $steps == *" kernels "* ]]; then
  (
    export MOCO_CUDA_KERNELS=1
    echo "== 0. $bin, MOCO_CUDA_KERNELS=1: moco-rs's fused CUDA kernels"
    within 90 "$bin" check-device --device cuda "${small[@]}" || echo "CUDA kernels check failed"
    within 90 "$bin" check-device --device cuda --arch resnet50 --width 16 --image-size 64 \
      --batch-size 16 || echo "CUDA kernels resnet50 check failed"
    for extra in "" --tf32; do
      gpu_peak "moco-rs ($bin) CUDA kernels $extra" within 150 "$bin" bench step --device cuda \
        "${r50[@]}" --queue-size 65536 --mlp --steps 3 $extra --profile --json
    done
    gpu_peak "moco-rs ($bin) CUDA kernels, small ResNet-18" within 90 "$bin" bench step --device cuda \
      --arch resnet18-small --width 64 --image-size 32 --channels 3 --batch-size 256 --steps 10 --json
    gpu_peak "moco-rs ($bin) CUDA kernels, extraction" within 90 "$bin" bench step --device cuda \
      "${r50[@]}" --extract --steps 5 --json
  )
fi
[[ $steps == *" bn "* ]] && for b in "${bins[@]}"; do
  [[ $b == *cudnn* ]] || continue
  (
    export MOCO_CUDNN_BN=1
    echo "== 5. $b, MOCO_CUDNN_BN=1: BatchNorm's training mode on cuDNN"
    within 90 "$b" check-device --device cuda "${small[@]}" || echo "cuDNN BatchNorm check failed"
    within 90 "$b" check-device --device cuda --arch resnet50 --width 16 --image-size 64 \
      --batch-size 16 || echo "cuDNN BatchNorm resnet50 check failed"
    echo "-- ${r50[*]} --queue-size 65536 --mlp --steps 3"
    gpu_peak "moco-rs ($b) cuDNN BatchNorm" within 150 "$b" bench step --device cuda "${r50[@]}" \
      --queue-size 65536 --mlp --steps 3 --phases --json
    gpu_peak "moco-rs ($b) cuDNN BatchNorm --tf32" within 150 "$b" bench step --device cuda \
      "${r50[@]}" --queue-size 65536 --mlp --steps 3 --tf32 --json
  )
done
if [[ $steps == *" e2e "* ]]; then
  run=target/gpu/e2e
  rm -rf "$run"
  mkdir -p "$run"
  echo "== 2. ${bins[0]}: the main job on CUDA (moco pretrain on the embedded data), knn, linear-eval"
  time within 120 "$bin" pretrain --device cuda --out "$run/pretrain" || echo "pretrain failed"
  within 60 "$bin" knn --weights "$run/pretrain" --dataset default --device cuda || echo "knn failed"
  within 90 "$bin" linear-eval --weights "$run/pretrain" --dataset default --cached-features \
    --epochs 20 --device cuda --out "$run/linear" || echo "linear-eval failed"
  echo "-- the same pretraining killed once its first checkpoint is written, then --resume"
  "$bin" pretrain --device cuda --out "$run/killed" > "$run/killed.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do
    if [ -e "$run/killed/checkpoint-last.safetensors" ] || ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  within 120 "$bin" pretrain --device cuda --resume --out "$run/killed" || echo "resume failed"
  same_run "$run/pretrain" "$run/killed"
fi
if [[ $steps == *" repeat "* ]]; then
  echo "== 6. ${bins[0]}: the main job twice, uninterrupted: is training on this GPU repeatable?"
  for i in 1 2; do
    rm -rf "target/gpu/repeat$i"
    within 120 "$bin" pretrain --device cuda --quiet --out "target/gpu/repeat$i" | tail -1 ||
      echo "pretrain $i failed"
  done
  same_run target/gpu/repeat1 target/gpu/repeat2
fi
if [[ $steps == *" bench "* ]]; then
  echo "== 3. training step throughput, moco-rs vs PyTorch on this GPU"
  PHASES=1 bench "${r50[@]}" --queue-size 65536 --mlp --steps 3
  bench --arch resnet18-small --width 64 --image-size 32 --channels 3 --batch-size 256 --steps 10
  echo "== 4. feature extraction (eval-mode forward of the frozen backbone), moco-rs vs PyTorch"
  bench "${r50[@]}" --extract --steps 5
fi
echo "== done in ${SECONDS}s"
