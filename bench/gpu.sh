#!/usr/bin/env bash
# The GPU check in one go, for a machine with an NVIDIA GPU (about 10 minutes on an H200):
#   1. the CUDA build (cargo, or the executables `bench/gpu.sh --prepare` built elsewhere),
#   2. the parity suite on the GPU (RL4PIX_DEVICE=cuda:0): UNet with attention capture, VAE,
#      pipeline output with LoRA, schedulers, text encoder, CLIP, f16/bf16 against f32,
#   3. one SD-1.5 UNet step in f16 (batch 3 = the three guidance branches, 64x64 latents = a
#      512x512 image, 77 tokens) against diffusers on the same card,
#   4. server throughput over HTTP at concurrency (= batch) 1, 4 and 8, default model and a
#      random-weight SD-1.5 pipeline,
# and prints one markdown table. A step that fails is a row that says so; the rest still run.
#
#   bench/gpu.sh --prepare   on a build machine without a GPU: builds the executables with CUDA
#                            (.ci/cuda-build.sh toolchain) into target/gpu/, for a GPU machine
#                            that has no Rust toolchain (carry target/gpu along)
#   bench/gpu.sh             on the GPU machine
# Environment: RL4PIX_DEVICE (default cuda:0), GPU_CHECK_PYTHON (python with torch; diffusers is
# needed for the comparison row, e.g. from carried wheels on PYTHONPATH), STEP_TIMEOUT (s, 300).
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
bundle="$root/target/gpu"
parity_tests=(unet_parity vae_parity pipeline_parity scheduler_parity text_encoder_parity
    clip_parity half_precision_parity)

if [ "${1:-}" = --prepare ]; then
    set -e
    eval "$(.ci/cuda-toolkit.sh)"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    bash .ci/cuda-build.sh build
    rm -rf "$bundle" && mkdir -p "$bundle/bin"
    tests=()
    for t in "${parity_tests[@]}"; do tests+=(--test "$t"); done
    cargo test -p rl4pix-model --features cuda "${tests[@]}" --no-run --message-format=json |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' |
        while read -r name exe; do cp "$exe" "$bundle/bin/$name"; done
    cargo build -p rl4pix-server --features cuda --example bench
    cp target/debug/examples/bench "$bundle/bin/server-bench"
    cp target/debug/rl4pix-bench "$bundle/bin/rl4pix-bench"
    strip "$bundle"/bin/*
    # The tests find their fixtures through the source path they were compiled in.
    echo "$root" >"$bundle/build-root"
    du -sh "$bundle"
    exit 0
fi

export RL4PIX_DEVICE="${RL4PIX_DEVICE:-cuda:0}"
python="${GPU_CHECK_PYTHON:-python3}"
step_timeout="${STEP_TIMEOUT:-300}"
log_dir="${GPU_CHECK_LOGS:-$root/target/gpu-logs}"
mkdir -p "$log_dir"
rows=()
row() { rows+=("| $1 | $2 | $3 |"); echo "== $1: $2 ($3)"; }

if command -v nvidia-smi >/dev/null; then
    gpu="$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader | head -n1)"
    cap="$(cut -d, -f3 <<<"$gpu" | tr -d ' .')"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
else
    gpu="no nvidia-smi"
fi
row "device" "$RL4PIX_DEVICE" "$gpu"

# 1. Executables.
start=$(date +%s)
if command -v cargo >/dev/null; then
    bins="$root/target/debug"
    tests=()
    for t in "${parity_tests[@]}"; do tests+=(--test "$t"); done
    if timeout "$step_timeout" cargo test -p rl4pix-model --features cuda "${tests[@]}" --no-run \
        >"$log_dir/build.log" 2>&1 &&
        timeout "$step_timeout" cargo build -p rl4pix-bench -p rl4pix-server --features cuda \
            --bins --example bench >>"$log_dir/build.log" 2>&1; then
        row "CUDA build (cargo)" "ok" "$(($(date +%s) - start)) s"
    else
        row "CUDA build (cargo)" "FAILED" "see $log_dir/build.log"
    fi
    test_cmd=(cargo test -q -p rl4pix-model --features cuda --test)
    bench_bin="$bins/rl4pix-bench"
    server_bench=(cargo run -q -p rl4pix-server --features cuda --example bench --)
elif [ -d "$bundle/bin" ]; then
    build_root="$(cat "$bundle/build-root")"
    if [ "$build_root" != "$root" ] && [ ! -e "$build_root" ]; then
        mkdir -p "$(dirname "$build_root")" && ln -s "$root" "$build_root"
    fi
    # The real CUDA libraries: the driver's, then the ones PyTorch's wheels bring.
    libs="$("$python" -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib*.so*", recursive=True)})))' 2>/dev/null)"
    export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    missing="$(ldd "$bundle/bin/rl4pix-bench" | grep 'not found' | tr -s ' \t' ' ')"
    row "CUDA build (prepared bundle)" "${missing:+MISSING LIBS}${missing:-ok}" "${missing:-built by bench/gpu.sh --prepare}"
    test_cmd=(run_bundled_test)
    bench_bin="$bundle/bin/rl4pix-bench"
    server_bench=("$bundle/bin/server-bench")
else
    row "CUDA build" "FAILED" "no cargo and no target/gpu (run bench/gpu.sh --prepare on a build machine)"
    printf '%s\n' "" "| step | result | detail |" "|---|---|---|" "${rows[@]}"
    exit 1
fi

# 2. The parity suite on the GPU.
for t in "${parity_tests[@]}"; do
    start=$(date +%s)
    if [ "${test_cmd[0]}" = run_bundled_test ]; then
        timeout "$step_timeout" "$bundle/bin/$t" >"$log_dir/$t.log" 2>&1
    else
        timeout "$step_timeout" "${test_cmd[@]}" "$t" >"$log_dir/$t.log" 2>&1
    fi
    status=$?
    summary="$(grep -E '^test result:' "$log_dir/$t.log" | tail -n1 | sed 's/^test result: //; s/; finished.*//')"
    if [ $status -eq 0 ]; then
        row "parity $t" "ok" "${summary:-?}, $(($(date +%s) - start)) s"
    else
        failed="$(grep -E '^    [a-z0-9_]+$' "$log_dir/$t.log" | tr -d ' ' | paste -sd, -)"
        row "parity $t" "FAILED (exit $status)" "${summary:-no summary} ${failed:+[$failed]}"
    fi
done

# 3. SD-1.5 UNet step, f16, against diffusers on the same card.
unet_args=(--config model/configs/instruct-pix2pix/unet_config.json --batch 3 --height 64 --width 64
    --tokens 77 --iters 10 --warmup 3 --device "$RL4PIX_DEVICE" --dtype f16)
ours="$(timeout "$step_timeout" "$bench_bin" unet "${unet_args[@]}" 2>"$log_dir/unet.err" |
    awk '/^ms_per_iter/ {print $2}')"
theirs="$(timeout "$step_timeout" "$python" bench/diffusers_bench.py unet "${unet_args[@]}" \
    2>"$log_dir/unet-diffusers.err" | awk '/^ms_per_iter/ {print $2}')"
if [ -n "$ours" ] && [ -n "$theirs" ]; then
    row "SD-1.5 UNet step f16, batch 3, 64x64" "$(awk -v a="$ours" -v b="$theirs" 'BEGIN {printf "%.2fx diffusers", a / b}')" "rl4pix $ours ms, diffusers $theirs ms (median of 10)"
else
    row "SD-1.5 UNet step f16, batch 3, 64x64" "${ours:+rl4pix $ours ms}${ours:-rl4pix FAILED}" "diffusers: ${theirs:-FAILED} (see $log_dir/unet*.err)"
fi

# 4. Server throughput, batch = concurrency 1, 4, 8.
throughput() { # name, model dir, dtype, image side, steps, requests per level
    local out
    out="$(RL4PIX_DTYPE="$3" timeout "$step_timeout" "${server_bench[@]}" --model "$2" --size "$4" \
        --steps "$5" --concurrency 1,4,8 --requests "$6" --rounds 1 2>&1 | tee "$log_dir/server-$1.log")"
    local figures
    figures="$(awk -F'|' '/^\| [0-9]+ \|/ {gsub(/ /, "", $2); gsub(/ /, "", $3); gsub(/ /, "", $4);
        printf "%sbatch %s: %s edits/s (p50 %s ms)", sep, $2, $3, $4; sep = ", "}' <<<"$out")"
    row "server $1 ($3, ${4}x$4, $5 steps)" "${figures:+ok}${figures:-FAILED}" "${figures:-see $log_dir/server-$1.log}"
}
throughput "default model" model/assets/toy f32 32 20 16
sd15="${TMPDIR:-/tmp}/rl4pix-sd15"
if [ -f "$sd15/model_index.json" ] ||
    timeout "$step_timeout" "$bench_bin" random-pipeline --dtype f16 --out "$sd15" >"$log_dir/sd15.log" 2>&1; then
    throughput "SD-1.5 config" "$sd15" f16 512 10 8
else
    row "server SD-1.5 config" "FAILED" "random-pipeline: see $log_dir/sd15.log"
fi

printf '%s\n' "" "| step | result | detail |" "|---|---|---|" "${rows[@]}"
