#!/usr/bin/env bash
# The main job end to end on the default engine (ONNX Runtime, CPU): install, export the
# 4-bit SmolLM2-135M-Instruct with the example pirate LoRA merged, as a 4-bit bundle (graph
# fused for ONNX Runtime), verify parity against PyTorch/PEFT on the same weights (and what
# 4 bits cost against fp32), generate.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bundles/smollm2-pirate}
PROMPT=${PROMPT:-What is the capital of France?}

bash scripts/install.sh
set -x
peft-export export --base smollm2-135m --adapter pirate=models/examples/pirate \
    --quantize int4 --ort-fusions cpu --out "$OUT" --force
peft-export verify "$OUT"
peft-export run "$OUT" --prompt "$PROMPT" --max-new-tokens 48
