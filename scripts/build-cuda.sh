#!/usr/bin/env bash
# Builds the `moco` binary with Candle's CUDA backend on a machine with no GPU and no system CUDA:
# the compiler and libraries come from PyPI's CUDA 13.0 wheels (the only ones with a complete
# nvcc), installed under target/cuda-toolkit.
#
#   scripts/build-cuda.sh                 # --features cuda   -> target/cuda/release/moco
#   FEATURES=cuda,nccl scripts/build-cuda.sh   # + multi-GPU training with NCCL
#   FEATURES=cudnn scripts/build-cuda.sh
#
# Settings (environment): CUDA_COMPUTE_CAP (default 90: H100/H200; candle compiles its kernels
# for this one architecture), CUDA_PREFIX (where the wheels go), FEATURES (comma-separated:
# cuda, cudnn, nccl).
#
# What the build needs, and why:
# - nvcc, cicc, the CUDA headers: candle-kernels compiles its .cu files with nvcc from PATH;
#   without a GPU it cannot query the architecture, hence CUDA_COMPUTE_CAP.
# - CUDARC_CUDA_VERSION=13000: cudarc would otherwise ask nvcc; pinned to the wheels' version
#   (13.0 needs only driver 580).
# - Unversioned libcublas.so, libcurand.so, ... : cudarc links these at build time, and the
#   wheels ship only the versioned files.
# - libcuda.so: there is no driver here, so a stub exporting the driver API's symbols (generated
#   from cudarc's own bindings) stands in at link time; its soname is libcuda.so.1, so the
#   binary loads the real driver library on a GPU machine.
# - The folders exist before the first build: cudarc's build script remembers its search paths.
# - nccl: NCCL 2.30 from PyPI (cudarc's bindings are for 2.30); linked as libnccl.so.2, so on the
#   GPU machine the NCCL of its PyTorch environment (nvidia/nccl/lib) serves.
set -euo pipefail
cd "$(dirname "$0")/.."

features=${FEATURES:-cuda}
has() { [[ ",$features," == *",$1,"* ]]; }
prefix=${CUDA_PREFIX:-$PWD/target/cuda-toolkit}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000

root=$prefix/nvidia/cu13
# pip --target does not merge into an existing folder: each wheel set gets its own prefix
# folder and the nvidia/ trees are linked side by side.
install_wheels() { # NAME MARKER WHEEL...
  local name=$1 marker=$2
  shift 2
  if [ ! -e "$marker" ]; then
    echo "installing $* into $prefix/$name" >&2
    rm -rf "${prefix:?}/$name"
    python3 -m pip install --quiet --disable-pip-version-check --target "$prefix/$name" "$@"
  fi
}
if [ ! -x "$root/bin/nvcc" ]; then
  rm -rf "${prefix:?}/nvidia"
  python3 -m pip install --quiet --disable-pip-version-check --target "$prefix" \
    "cuda-toolkit[nvcc,crt,nvvm,cudart,nvrtc,cublas,curand,cccl]==13.0.2"
fi
libdirs=("$root/lib")
if has cudnn; then
  # Pinned: the version the GPU-checked binary was built with (it ran with cuDNN 9.19 there).
  install_wheels cudnn-wheel "$prefix/cudnn-wheel/nvidia/cudnn/lib" "nvidia-cudnn-cu13==9.28.1.4"
  ln -sfn "$prefix/cudnn-wheel/nvidia/cudnn" "$prefix/nvidia/cudnn"
  libdirs+=("$prefix/nvidia/cudnn/lib")
fi
if has nccl; then
  install_wheels nccl-wheel "$prefix/nccl-wheel/nvidia/nccl/lib" "nvidia-nccl-cu13==2.30.7"
  libdirs+=("$prefix/nccl-wheel/nvidia/nccl/lib")
fi

# Unversioned names for every versioned library (libcublas.so.13 -> libcublas.so).
for dir in "${libdirs[@]}"; do
  for f in "$dir"/lib*.so.*; do
    base=${f%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$f")" "$base"
  done
done

# The driver stub.
stubs=$root/lib/stubs
if [ ! -e "$stubs/libcuda.so" ]; then
  mkdir -p "$stubs"
  cudarc=$(cargo metadata --format-version 1 --manifest-path moco-cli/Cargo.toml --features cuda 2>/dev/null |
    python3 -c 'import json, sys, os; m = json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
  python3 - "$cudarc/src/driver/sys/mod.rs" "$stubs/libcuda_stub.c" <<'PY'
import re, sys
names = sorted(set(re.findall(r'load::<_F>\("(cu\w+)"\)', open(sys.argv[1]).read())))
if not names:
    sys.exit(f"no driver symbols found in {sys.argv[1]}")
with open(sys.argv[2], "w") as f:
    f.write("/* Link-time stand-in for the CUDA driver (libcuda.so.1); never loaded at run time. */\n")
    for n in names:
        f.write(f"int {n}(void) {{ return 999; }}\n")
print(f"libcuda stub: {len(names)} driver symbols", file=sys.stderr)
PY
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c"
fi

export CUDA_ROOT=$root CUDA_PATH=$root
export PATH=$root/bin:$PATH
export LIBRARY_PATH=$root/lib:$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
if has nccl; then
  export LIBRARY_PATH=$prefix/nccl-wheel/nvidia/nccl/lib:$LIBRARY_PATH
fi
if has cudnn; then
  export CUDNN_LIB=$prefix/nvidia/cudnn/lib CUDNN_INCLUDE_DIR=$prefix/nvidia/cudnn/include
  export LIBRARY_PATH=$prefix/nvidia/cudnn/lib:$LIBRARY_PATH
  export CPATH=$prefix/nvidia/cudnn/include${CPATH:+:$CPATH}
fi
nvcc --version | tail -2 >&2
# A target folder of its own: the CPU build in target/ stays as it is.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
cargo build --release -p moco-cli --no-default-features --features "$features"
echo "built $CARGO_TARGET_DIR/release/moco with --features $features for compute capability $CUDA_COMPUTE_CAP" >&2
