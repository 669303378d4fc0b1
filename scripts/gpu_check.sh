#!/usr/bin/env bash
# GPU check of the MultiLoRA kernels, for a machine with an NVIDIA GPU (written for the
# project's H200 machine: torch with CUDA, nvcc, cmake, no TensorRT, no network, the repo
# copied to the working directory and not installed).
#
#   scripts/gpu_check.sh    # results in $OUT, else plugins/multilora/build/gpu-check
#
# Steps: build the kernels (CMake, nvcc, sm_90 unless CUDA_ARCH says otherwise), run the GPU
# tests, run the benchmark, then compute-sanitizer memcheck and racecheck on small shapes
# of both paths. Every step runs even if one before it failed; the exit status is non-zero
# if any did. Files written (at most 8): env.log, build.log, pytest-gpu.log, pytest-gpu.xml,
# bench.json, bench.log, sanitizer.log, summary.txt.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO="$PWD"
RESULTS="${OUT:-$REPO/plugins/multilora/build/gpu-check}"
BUILD="$REPO/plugins/multilora/build"
CUDA_ARCH="${CUDA_ARCH:-90}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
export PEFT_EXPORT_PLUGIN_DIR="$BUILD"
# Keep the working directory off sys.path: the repository's own peft_export/ folder holds
# no plugins/ and would shadow the import shim below (Python >= 3.11).
export PYTHONSAFEPATH=1

failed=()
step() {  # step NAME LOG COMMAND...: run, tee the log, remember a failure
    local name="$1" log="$2"
    shift 2
    echo "=== $name" | tee -a "$log"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed+=("$name")
    echo "$name: exit $rc ($((SECONDS - start)) s)" >> "$RESULTS/summary.txt"
}
: > "$RESULTS/summary.txt"

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    nvcc --version | tail -2
    cmake --version | head -1
    python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    command -v compute-sanitizer || echo "no compute-sanitizer on PATH"
} > "$RESULTS/env.log" 2>&1

# peft_export is not installed there: expose the package folders under their import names.
if ! python3 -c "import peft_export.plugins" 2>/dev/null; then
    SHIM="$(mktemp -d)"
    mkdir -p "$SHIM/peft_export"
    cp "$REPO/peft_export/__init__.py" "$SHIM/peft_export/"
    ln -s "$REPO/plugins" "$SHIM/peft_export/plugins"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

# Without a visible GPU every GPU test would skip and pass: make that a failure.
step cuda "$RESULTS/env.log" python3 -c \
    "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print(torch.cuda.get_device_name())"

build() {
    cmake -S "$REPO/plugins/multilora" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DPEFT_MULTILORA_PLUGIN=OFF &&
        cmake --build "$BUILD" -j "$(nproc)"
}
step build "$RESULTS/build.log" build

step pytest-gpu "$RESULTS/pytest-gpu.log" \
    python3 -m pytest -m gpu tests/test_multilora_gpu.py -q -rs -p no:cacheprovider \
    --junitxml "$RESULTS/pytest-gpu.xml"

step bench "$RESULTS/bench.log" python3 scripts/bench_kernels.py --out "$RESULTS/bench.json"

# Out-of-bounds accesses and shared-memory races on real hardware (the CPU emulation used in
# CI cannot see either). No caching allocator, so every tensor is its own allocation.
SANITIZE_PY='
import sys
import torch
from peft_export.plugins import KernelPath, multilora_forward
g = torch.Generator(device="cuda").manual_seed(0)
# Odd sizes and rows over one tile, rank over one rank chunk, a 20-row slot (two decode tiles).
shapes = [(3, 70, 130, 70, 20, 4), (5, 1, 256, 136, 136, 3), (20, 2, 64, 40, 8, 3)]
dtypes = [torch.float32, torch.float16, torch.bfloat16]
if sys.argv[1] == "light":  # racecheck is slow: one shape, the SIMT and tensor-core kernels
    shapes, dtypes = shapes[:1], dtypes[:2]
for dtype in dtypes:
    for batch, seq, k, n, r, slots in shapes:
        x = torch.randn(batch, seq, k, generator=g, device="cuda").to(dtype)
        A = torch.randn(slots, r, k, generator=g, device="cuda").to(dtype)
        B = torch.randn(slots, n, r, generator=g, device="cuda").to(dtype)
        ids = torch.randint(-1, slots + 1, (batch,), generator=g, device="cuda")
        for path in (KernelPath.PREFILL, KernelPath.DECODE):
            multilora_forward(x, A, B, ids, path=path)
torch.cuda.synchronize()
print("sanitizer workload done")
'
sanitize() {
    if ! command -v compute-sanitizer > /dev/null; then
        echo "compute-sanitizer not found"
        return 1
    fi
    local rc=0
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool memcheck \
        --error-exitcode 3 python3 -c "$SANITIZE_PY" full || rc=1
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool racecheck \
        --error-exitcode 3 python3 -c "$SANITIZE_PY" light || rc=1
    return $rc
}
step sanitizer "$RESULTS/sanitizer.log" sanitize

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}" | tee -a "$RESULTS/summary.txt"
    exit 1
fi
echo "all steps passed" | tee -a "$RESULTS/summary.txt"
