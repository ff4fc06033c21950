#!/usr/bin/env bash
# Compiles the CUDA build (`--features cuda`) on a machine with no GPU and no driver.
#
#   .ci/cuda-build.sh          cargo build: every crate, every CUDA kernel, every executable linked
#   .ci/cuda-build.sh check    cargo check: every CUDA kernel compiled by nvcc (build scripts run
#                              under check too) and every cfg(feature = "cuda") line type-checked,
#                              nothing linked (the fast variant)
#
# The toolchain is NVIDIA's CUDA 13.0 wheels from PyPI (.ci/cuda-toolkit.sh). Kernels are built
# for CUDA_COMPUTE_CAP (default 90, Hopper: H100/H200): with no GPU there is nothing to detect it
# from, and candle's kernel build would otherwise ask nvidia-smi. The executables link against
# stand-ins for the driver and the cuBLAS/cuRAND/NVRTC libraries (.ci/cuda-stubs.py); a GPU
# machine loads the real ones at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-build}"
case "$mode" in
    build | check) ;;
    *) echo "usage: $0 [build|check]" >&2; exit 2 ;;
esac

eval "$(.ci/cuda-toolkit.sh)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# nvcc jobs inside candle's kernel build (its default is half the cores).
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
nvcc --version | tail -n 2

packages=(-p rl4pix-model -p rl4pix-training -p rl4pix-server -p rl4pix-bench)
start=$(date +%s)
if [ "$mode" = check ]; then
    cargo check "${packages[@]}" --features cuda --all-targets
else
    cargo fetch --quiet
    cudarc_src="$(cargo metadata --format-version 1 --features rl4pix-model/cuda |
        python3 -c 'import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc"))')"
    python3 .ci/cuda-stubs.py "$(dirname "$cudarc_src")/src" "$CUDA_HOME/lib/stubs"
    cargo build "${packages[@]}" --features cuda --bins
    # Every executable names the real libraries, not the stand-ins.
    for bin in target/debug/rl4pix-server target/debug/rl4pix-train target/debug/rl4pix-bench; do
        needed="$(readelf -d "$bin" | grep NEEDED)"
        for lib in libcuda.so.1 libcublas.so.13 libcudart.so.13; do
            grep -q "\[$lib\]" <<<"$needed" || { echo "$bin does not link $lib" >&2; exit 1; }
        done
    done
fi
echo "cuda $mode: $(( $(date +%s) - start )) s (compute capability $CUDA_COMPUTE_CAP)"
