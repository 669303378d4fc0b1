#!/usr/bin/env bash
# Build dependencies of the C++ runtime (runtime/cpp): a JSON library, a compiler, CMake,
# and ONNX Runtime's C/C++ headers (the onnxruntime wheel ships the library, not headers).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in nlohmann-json3-dev cmake g++; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
scripts/fetch_ort_headers.sh >/dev/null
