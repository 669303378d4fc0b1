#!/usr/bin/env bash
# Build the MultiLoRA CPU kernel (plugins/multilora -> libpeft_multilora_ort.so). With it, the
# ONNX Runtime backend runs runtime-adapter bundles (fp32, CPU) through a native kernel instead
# of the op's ONNX function body, and adapter slots are written in one native copy.
# Needs cmake, a C++17 compiler and ONNX Runtime's C++ headers (fetched here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
include_dir="$(scripts/fetch_ort_headers.sh)"
cmake -S plugins/multilora -B plugins/multilora/build -DPEFT_MULTILORA_ORT=ON \
    -DONNXRUNTIME_INCLUDE_DIR="$include_dir" >/dev/null
cmake --build plugins/multilora/build -j --target peft_multilora_ort >/dev/null
echo "plugins/multilora/build/libpeft_multilora_ort.so"
