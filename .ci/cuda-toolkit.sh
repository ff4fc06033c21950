#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler toolchain from NVIDIA's PyPI wheels into a local prefix and
# prints the environment that points the CUDA build at it (`eval "$(.ci/cuda-toolkit.sh)"`).
# Nothing here needs a GPU or a driver: nvcc, cicc and ptxas only translate CUDA C++ to PTX/SASS.
#
# 13.0 rather than the newest 13.x: a driver JIT-compiles PTX only from toolkits no newer than
# itself, so the oldest CUDA 13 release runs on the most drivers (any R580 or later), and cudarc
# (candle's CUDA binding) knows versions up to 13.4 only.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${RL4PIX_CUDA_PREFIX:-$PWD/target/cuda-toolkit}"
wheels=(
    nvidia-cuda-nvcc==13.0.88   # nvcc driver, ptxas, fatbinary, nvlink, cudafe++
    nvidia-cuda-crt==13.0.88    # crt/ headers nvcc includes into every translation unit
    nvidia-nvvm==13.0.88        # cicc (CUDA C++ -> NVVM IR -> PTX) and libdevice
    nvidia-cuda-runtime==13.0.96 # cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, libcudart
    nvidia-cuda-cccl==13.0.85   # cuda/std, cub, thrust (candle's kernels include cuda/std)
)
stamp="$prefix/.installed-$(printf '%s\n' "${wheels[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    rm -rf "$prefix"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-compile --root-user-action=ignore \
        --target "$prefix" "${wheels[@]}" >&2
    root="$prefix/nvidia/cu13"
    # The wheels ship only the versioned runtime library; the linker looks for libcudart.so.
    ln -sf libcudart.so.13 "$root/lib/libcudart.so"
    touch "$stamp"
fi
root="$prefix/nvidia/cu13"
echo "export CUDA_HOME='$root'"
echo "export NVCC='$root/bin/nvcc'"
echo "export PATH='$root/bin':\"\$PATH\""
echo "export LIBRARY_PATH='$root/lib'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
