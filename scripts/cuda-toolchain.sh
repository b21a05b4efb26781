#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain from PyPI wheels, for building the
# `gpu-decoder` feature (candle's CUDA backend compiles its kernels with nvcc
# at build time) on a machine without a CUDA install or a GPU.
#
#   scripts/cuda-toolchain.sh [DIR]      # default: <repo>/.cuda-toolchain
#   eval "$(scripts/cuda-toolchain.sh --env [DIR])"
#   cargo build --release -p bench-suite --features gpu-decoder
#
# What it does (the route of ../shared/GPU.md, "Route 2"):
# - `pip install --target` of the pinned 13.0 wheels (nvcc, nvvm, the
#   runtime, crt, nvrtc, cublas, curand, cccl); pinned to 13.0 so that the
#   PTX they emit loads on a 13.0 driver;
# - unversioned links in cu13/lib (the linker asks for libcublas.so, ...);
# - a link-time stub `libcuda.so` (soname libcuda.so.1) in cu13/lib/stubs,
#   made from the driver symbols that cudarc declares. The stub is never
#   loaded at run time: the GPU machine's driver provides the real one.
# With --env it only prints the environment the build needs (and fails if
# the toolchain is not installed).
#
# The binary it builds links libcublas/libcurand/libcudart of CUDA 13 and
# libcuda dynamically: run it where those are (the GPU machine has them in
# its PyTorch install; see workloads/src/spectr/README.md, "On a GPU").
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_only=0
if [[ ${1:-} == --env ]]; then
  env_only=1
  shift
fi
dir=${1:-$repo/.cuda-toolchain}
c=$dir/nvidia/cu13

die() {
  echo "cuda-toolchain: $*" >&2
  exit 1
}

print_env() {
  [[ -x $c/bin/nvcc && -f $c/lib/stubs/libcuda.so ]] ||
    die "no toolchain in $dir; run scripts/cuda-toolchain.sh ${dir@Q} first"
  cat <<EOF
export PATH=${c@Q}/bin:\$PATH
export CUDA_ROOT=${c@Q} CUDA_PATH=${c@Q} CUDA_HOME=${c@Q}
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export LD_LIBRARY_PATH=${c@Q}/lib:${c@Q}/lib/stubs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
}

if ((env_only)); then
  print_env
  exit 0
fi

wheels=(
  nvidia-cuda-nvcc==13.0.88
  "nvidia-nvvm==13.0.*"
  nvidia-cuda-runtime==13.0.96
  "nvidia-cuda-crt==13.0.*"
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
  "nvidia-cuda-cccl==13.0.*"
)
if [[ ! -x $c/bin/nvcc ]]; then
  echo "cuda-toolchain: installing ${wheels[*]} into $dir" >&2
  python3 -m pip install --quiet --no-deps --target "$dir" "${wheels[@]}" ||
    die "pip could not install the CUDA wheels (is PyPI reachable?)"
fi
[[ -x $c/bin/nvcc ]] || die "the wheels did not provide $c/bin/nvcc"

# Unversioned names for the linker.
link() { # link NAME PATTERN
  local target
  target=$(cd "$c/lib" && ls $2 2>/dev/null | head -n1) || true
  [[ -n $target ]] || die "no $2 in $c/lib"
  ln -sfn "$target" "$c/lib/$1"
}
link libcublas.so 'libcublas.so.13*'
link libcublasLt.so 'libcublasLt.so.13*'
link libcudart.so 'libcudart.so.13*'
link libnvrtc.so 'libnvrtc.so.13*'
link libcurand.so 'libcurand.so.10*'

# The link-time libcuda stub: one empty function per driver entry point
# that cudarc's bindings name.
if [[ ! -f $c/lib/stubs/libcuda.so ]]; then
  cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -n1)
  [[ -n $cudarc ]] || die "cudarc's source is not in the cargo registry; run 'cargo fetch' first"
  mkdir -p "$c/lib/stubs"
  grep -rhoE '\bfn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys" |
    awk '{print $2}' | sort -u |
    sed 's/.*/void &(void) {}/' >"$c/lib/stubs/libcuda_stub.c" || true
  [[ -s $c/lib/stubs/libcuda_stub.c ]] || die "found no driver symbols in $cudarc"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$c/lib/stubs/libcuda.so" \
    "$c/lib/stubs/libcuda_stub.c" || die "cannot build the libcuda stub"
fi
echo "cuda-toolchain: ready in $dir; eval \"\$(scripts/cuda-toolchain.sh --env ${dir@Q})\"" >&2
