#!/usr/bin/env bash
# install.sh's MultiLoRA CPU kernel step: build libpeft_multilora_ort.so with
# scripts/build_cpu_kernel.sh. Without the library everything still works, but ONNX Runtime
# runs runtime adapters on CPU through the op's ONNX function body, which is slower; so a
# build that cannot run or fails prints a WARNING on stderr with the reason and the fix, and
# the install goes on. With CI set (CI=true, as .ci/run runs) it is an ERROR and exits 1: CI's
# runtime tests must run the kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
library=plugins/multilora/build/libpeft_multilora_ort.so

in_ci() { [[ -n "${CI:-}" && "${CI,,}" != "false" && "${CI}" != "0" ]]; }

not_built() {  # not_built REASON FIX
    if in_ci; then
        echo "ERROR: the MultiLoRA CPU kernel was not built: $1. Fix: $2." >&2
        exit 1
    fi
    echo "WARNING: the MultiLoRA CPU kernel was not built: $1; runtime adapters on CPU will" \
        "run the MultiLoRA op's ONNX function body instead (slower). Fix: $2." >&2
    exit 0
}

for tool in cmake c++; do
    command -v "$tool" >/dev/null ||
        not_built "$tool not found" \
            "install cmake and a C++17 compiler (e.g. apt-get install cmake g++), then run scripts/build_cpu_kernel.sh"
done
echo "== building the MultiLoRA CPU kernel"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! scripts/build_cpu_kernel.sh >"$log" 2>&1; then
    reason="$( (grep -m1 -A2 -iE 'error|fail|not found|unable' "$log" || tail -n2 "$log") |
        tr -s '[:space:]' ' ')"
    not_built "scripts/build_cpu_kernel.sh failed (${reason% })" \
        "run scripts/build_cpu_kernel.sh to see its whole output"
fi
[[ -f "$library" ]] ||
    not_built "scripts/build_cpu_kernel.sh did not write $library" \
        "run scripts/build_cpu_kernel.sh to see its whole output"
echo "   $library"
