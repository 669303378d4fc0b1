#!/usr/bin/env bash
# Build llama.cpp from the llama-cpp-python sdist (it vendors llama.cpp, its converters and
# gguf-py) and install the binding against that build, all under WORKDIR/llama.cpp.
#
# Why the sdist: it is the one llama.cpp source PyPI serves. Why a separate native build: the
# binding's own build compiles everything in one pip call (no progress, no reuse); building the
# library once with cmake and pointing the binding at it (LLAMA_CPP_LIB_PATH) lets reruns and
# the converters reuse it. Idempotent: each finished step leaves a marker and is skipped next
# time. Takes ~10 minutes on 2 cores the first time (llama-server: a few more); run it in the
# background and poll the log.
#
#     scripts/peers/setup_llama_cpp.sh WORKDIR   # prints (and writes to WORKDIR/llama.cpp/lib_dir)
#                                                # the folder with libllama.so
set -euo pipefail

WORKDIR=${1:?usage: setup_llama_cpp.sh WORKDIR}
VERSION=0.3.36
PYTHON=${PYTHON:-python3}
ROOT="$WORKDIR/llama.cpp"
SRC="$ROOT/llama_cpp_python-$VERSION"
VENV="$ROOT/venv"
mkdir -p "$ROOT"

# CPU flags: native, except on CPUs with AMX. ggml's AMX matmul (compiled in by -march=native
# there) dies with a general protection fault at its first `ldtilecfg` on Q8_0 / Q4_0 on this
# project's benchmark machine (Xeon with AMX, llama.cpp of llama-cpp-python 0.3.36), so such a
# CPU gets an explicit list of its AVX-512 / VNNI features instead: the same SIMD kernels and
# weight repacking, without the AMX path.
if grep -qw amx_tile /proc/cpuinfo; then
    FLAVOR=noamx
    CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
        -DGGML_BMI2=ON)
    for feature in avx512f:AVX512 avx512_vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI \
        avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
        grep -qw "${feature%%:*}" /proc/cpuinfo && CPU_FLAGS+=("-DGGML_${feature##*:}=ON")
    done
else
    FLAVOR=native
    CPU_FLAGS=(-DGGML_NATIVE=ON)
fi
BUILD="$ROOT/build-$FLAVOR"

if [ ! -f "$ROOT/.fetched" ]; then
    "$PYTHON" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$ROOT" >&2
    tar xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
    touch "$ROOT/.fetched"
fi

if [ ! -f "$BUILD/.built" ]; then
    # Only the library and llama-quantize (Q4_0 has no Python converter).
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON "${CPU_FLAGS[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON >&2
    cmake --build "$BUILD" --target llama llama-quantize -j "$(nproc)" >&2
    touch "$BUILD/.built"
fi

if [ ! -f "$BUILD/.server_built" ]; then
    # llama-server (scripts/bench_serving.py): the same build folder, so only the server's own
    # sources compile. A build in progress (here or elsewhere on the box) finishes first.
    while pgrep -f "cmake --build" >/dev/null; do sleep 15; done
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DLLAMA_BUILD_SERVER=ON >&2
    cmake --build "$BUILD" --target llama-server -j "$(nproc)" >&2
    touch "$BUILD/.server_built"
fi

if [ ! -f "$ROOT/.bound" ]; then
    # Own virtualenv: the binding's pins must not touch the project's environment. System
    # site-packages stay visible (numpy; torch and transformers for the converters).
    "$PYTHON" -m venv --system-site-packages "$VENV"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$VENV/bin/python" -m pip install --no-build-isolation "$SRC" >&2 ||
        CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
            "$VENV/bin/python" -m pip install "$SRC" >&2
    # The converters' own needs (convert_hf_to_gguf.py imports sentencepiece unconditionally).
    "$VENV/bin/python" -m pip install sentencepiece protobuf >&2
    LLAMA_CPP_LIB_PATH="$BUILD/bin" "$VENV/bin/python" -c "import llama_cpp" >&2
    touch "$ROOT/.bound"
fi

# The folder with libllama.so, for the Python side of the set-up (setup_llama_cpp.py).
echo "$BUILD/bin" | tee "$ROOT/lib_dir"
