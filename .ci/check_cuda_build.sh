#!/usr/bin/env bash
# CI: build the C++/CUDA extension against the CUDA build of torch and check that the CUDA kernels
# are registered. Needs nvcc (CUDA 13) but no GPU: importing the CUDA build of torch works on a
# machine without one.
#
#   .ci/check_cuda_build.sh [VENV]      VENV: a fresh virtual environment (default build/ci-cuda/venv,
#                                       git-ignored); it is recreated on every run.
#
# The extension is built into build/ci-cuda/lib (temporary objects in a temp dir), not into
# autolr_fused/, so the source tree's own build (another torch's ABI) is left alone; INPLACE=1 builds
# into autolr_fused/ instead (python setup.py build_ext --inplace). TORCH_CUDA_ARCH_LIST defaults to
# "9.0" (Hopper only), MAX_JOBS to 2; CUDA_HOME is found from nvcc when not set.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
VENV="${1:-build/ci-cuda/venv}"
LIB_DIR="$REPO/build/ci-cuda/lib"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
start=$SECONDS

# ---------------------------------------------------------------------------- toolchain
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")"; do
    if [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      CUDA_HOME="$candidate"
      break
    fi
  done
fi
if [ -z "${CUDA_HOME:-}" ]; then
  echo "check_cuda_build: no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)" >&2
  exit 1
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "check_cuda_build: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1))"

# ---------------------------------------------------------------------------- environment
python3 -m venv --clear "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --no-compile "torch==2.14.1" setuptools wheel ninja
export PATH="$(cd "$VENV/bin" && pwd):$PATH"  # ninja
echo "check_cuda_build: venv ready after $((SECONDS - start)) s"

# torch's CUDA headers include cuBLAS, cuSPARSE and cuSOLVER headers that a bare toolkit may lack:
# take them (and the libraries) from the nvidia pip packages torch depends on.
NVIDIA_DIRS="$("$PY" - <<'EOF'
import glob, os, sysconfig
root = os.path.join(sysconfig.get_paths()["purelib"], "nvidia")
includes = sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
libs = sorted(d for d in glob.glob(os.path.join(root, "*", "lib")) if os.path.isdir(d))
print(":".join(includes))
print(":".join(libs))
EOF
)"
NVIDIA_INCLUDES="$(echo "$NVIDIA_DIRS" | sed -n 1p)"
NVIDIA_LIBS="$(echo "$NVIDIA_DIRS" | sed -n 2p)"
export CPATH="${NVIDIA_INCLUDES}${CPATH:+:$CPATH}"
export LIBRARY_PATH="$CUDA_HOME/lib64:${NVIDIA_LIBS}${LIBRARY_PATH:+:$LIBRARY_PATH}"

# ---------------------------------------------------------------------------- build
BUILD_TEMP="$(mktemp -d "${TMPDIR:-/tmp}/autolr_fused_cuda_build.XXXXXX")"
trap 'rm -rf "$BUILD_TEMP"' EXIT
if [ "${INPLACE:-0}" = "1" ]; then
  "$PY" setup.py build_ext --inplace --build-temp "$BUILD_TEMP"
  SO="$(ls "$REPO"/autolr_fused/_C*.so)"
else
  rm -rf "$LIB_DIR"
  "$PY" setup.py build_ext --build-lib "$LIB_DIR" --build-temp "$BUILD_TEMP"
  SO="$(ls "$LIB_DIR"/autolr_fused/_C*.so)"
fi
echo "check_cuda_build: built $SO after $((SECONDS - start)) s"

# ---------------------------------------------------------------------------- check
"$PY" - "$SO" <<'EOF'
import sys

import torch

torch.ops.load_library(sys.argv[1])
ops = ("sgd_step", "sgd_reduce", "boundary_pass", "adam_step", "adam_reduce")
missing = [
    f"autolr_fused::{op} ({key})"
    for op in ops
    for key in ("CPU", "CUDA")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"autolr_fused::{op}", key)
]
if missing:
    sys.exit("check_cuda_build: no kernel registered for " + ", ".join(missing))
print(f"check_cuda_build: CPU and CUDA kernels registered for {', '.join(ops)} (torch {torch.__version__})")
EOF
echo "check_cuda_build: OK in $((SECONDS - start)) s"
