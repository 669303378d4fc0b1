"""The MultiLoRA CUDA kernels run on CPU threads, against a float64 numpy reference.

CI has nvcc but no GPU. This compiles the kernels' own source (multiLoRAKernels.cu) with g++
against plugins/multilora/cpu_emulation (threads + barriers for the CUDA execution model,
whole-tile WMMA fragments), so that the tiling, the decode plan, split-K, the bounds of odd
sizes and the fp32 accumulation are checked on every commit. Timing, real fragment layouts
and the GPU memory model are left to tests/test_multilora_gpu.py.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

SOURCE_DIR = Path(__file__).resolve().parents[1] / "plugins" / "multilora"
FP32, FP16, BF16 = 0, 1, 2
PREFILL, DECODE = 1, 2
OK, ERR_INVALID, ERR_WORKSPACE = 0, 1, 2
UNIT_ROUNDOFF = {FP16: 2.0**-11, BF16: 2.0**-8}


def _cuda_include() -> Path | None:
    """A CUDA include folder with cuda_fp16.h (the emulation uses the real half types)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    return None


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    include = _cuda_include()
    if include is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h) to compile the emulation")
    out = tmp_path_factory.mktemp("emu") / "libpeft_multilora_emulated.so"
    subprocess.run(
        ["g++", "-std=c++20", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread",
         "-x", "c++", f"-I{include}", str(SOURCE_DIR / "cpu_emulation" / "emulated_kernels.cpp"),
         "-o", str(out)],
        check=True,
    )  # fmt: skip
    lib = ctypes.CDLL(str(out))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.peft_multilora_workspace_size.restype = ctypes.c_size_t
    lib.peft_multilora_workspace_size.argtypes = [i64] * 6
    lib.peft_multilora_forward_path.restype = ctypes.c_int
    lib.peft_multilora_forward_path.argtypes = (
        [ctypes.c_int, ptr, ptr, ptr, ptr]
        + [i64] * 6
        + [ptr, ptr, ctypes.c_size_t, ptr, ctypes.c_int]
    )
    return lib


def _to_bf16(a: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bits (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _codec(dtype: int) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[..., np.ndarray]]:
    """(to device storage, back to float64) for a PEFT_ML_* dtype."""
    if dtype == BF16:
        return _to_bf16, _from_bf16
    np_type = np.float32 if dtype == FP32 else np.float16
    return (lambda a: np.ascontiguousarray(a, dtype=np_type)), (lambda a: a.astype(np.float64))


def _reference(x: np.ndarray, A: np.ndarray, B: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64, row by row and token by token; ids normalized like the kernels."""
    slots = A.shape[0]
    out = np.zeros((x.shape[0], x.shape[1], B.shape[1]))
    for b, i in enumerate(ids):
        s = i + slots if i < 0 else i
        if 0 < s < slots:
            for t in range(x.shape[1]):
                out[b, t] = B[s] @ (A[s] @ x[b, t])
    return out


def _run(lib: ctypes.CDLL, dtype: int, x, A, B, ids, path: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel output, reference), both float64, from the same dtype-rounded inputs."""
    batch, seq, k = x.shape
    slots, rank, _ = A.shape
    n = B.shape[1]
    enc, dec = _codec(dtype)
    xd, ad, bd = enc(x), enc(A), enc(B)
    out = np.full((batch, seq, n), 0x7F, dtype=xd.dtype)  # garbage: every element is written
    ids64 = np.ascontiguousarray(ids, dtype=np.int64)
    size = lib.peft_multilora_workspace_size(batch, seq, k, n, rank, slots)
    ws = np.full(size, 0xFF, dtype=np.uint8)  # NaN bits: no region may be read unwritten
    status = lib.peft_multilora_forward_path(
        dtype, xd.ctypes.data, ad.ctypes.data, bd.ctypes.data, ids64.ctypes.data,
        batch, seq, k, n, rank, slots, out.ctypes.data, ws.ctypes.data, size, None, path,
    )  # fmt: skip
    assert status == OK
    return dec(out), _reference(dec(xd), dec(ad), dec(bd), ids64)


def _check(got: np.ndarray, ref: np.ndarray, dtype: int) -> None:
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = np.abs(got - ref)
    if dtype == FP32:
        assert err.max() <= 1e-5 * scale
        return
    # One rounding of an fp32-accurate sum: within the unit roundoff, and (the sharp part)
    # equal to the correctly rounded result except for values next to a rounding boundary.
    assert np.all(err <= UNIT_ROUNDOFF[dtype] * np.abs(ref) + 1e-5 * scale)
    enc, dec = _codec(dtype)
    assert np.mean(got != dec(enc(ref))) <= 0.02


def _problem(rng: np.random.Generator, batch: int, seq: int, k: int, n: int, r: int, slots: int):
    x = rng.standard_normal((batch, seq, k))
    A = rng.standard_normal((slots, r, k)) / np.sqrt(k)
    B = rng.standard_normal((slots, n, r)) / np.sqrt(max(r, 1))
    A[0] = 0
    B[0] = 0
    return x, A, B


# (batch, seq, in, out, rank, slots, ids): aligned sizes take 16-byte vector loads, odd ones
# the element-wise path; rank 136 needs two 128-row rank chunks; seq 66 two prefill tiles
# per row; 20 decode rows of one slot two decode tiles.
CASES = {
    "mixed_ids": (4, 3, 256, 136, 16, 5, [0, 2, 2, -1]),
    "odd_sizes": (3, 5, 33, 17, 3, 4, [1, 3, 0]),
    "rank_136": (2, 2, 64, 24, 136, 3, [2, 1]),
    "long_rows": (2, 66, 48, 40, 8, 3, [1, 2]),
    "one_adapter": (20, 1, 64, 32, 8, 3, [2] * 20),
}


@pytest.mark.parametrize("path", [PREFILL, DECODE], ids=["prefill", "decode"])
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernels_match_reference(lib: ctypes.CDLL, case: tuple, dtype: int, path: int) -> None:
    batch, seq, k, n, r, slots, ids = case
    x, A, B = _problem(np.random.default_rng(list(case[:6])), batch, seq, k, n, r, slots)
    got, ref = _run(lib, dtype, x, A, B, np.array(ids), path)
    _check(got, ref, dtype)


@pytest.mark.parametrize("path", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_slot_zero_and_out_of_range_rows_are_zero(lib: ctypes.CDLL, path: int) -> None:
    x, A, B = _problem(np.random.default_rng(1), 4, 2, 32, 16, 8, 3)
    A[0] = 1.0  # a slot 0 that is not zero proves its rows are skipped, not computed
    B[0] = 1.0
    got, _ = _run(lib, FP32, x, A, B, np.array([0, 3, -4, 1]), path)
    assert np.all(got[:3] == 0)
    assert np.all(got[3] != 0)


@pytest.mark.parametrize("shape", [(2, 3, 0, 8, 4), (2, 3, 8, 8, 0)], ids=["in_0", "rank_0"])
def test_empty_products_give_zeros(lib: ctypes.CDLL, shape: tuple) -> None:
    batch, seq, k, n, r = shape
    x, A, B = _problem(np.random.default_rng(2), batch, seq, k, n, r, 2)
    got, _ = _run(lib, FP32, x, A, B, np.array([1, 1]), PREFILL)
    assert np.all(got == 0)


def test_invalid_arguments_are_refused(lib: ctypes.CDLL) -> None:
    x = np.zeros((2, 1, 8), np.float32)
    A = np.zeros((2, 4, 8), np.float32)
    B = np.zeros((2, 8, 4), np.float32)
    ids = np.zeros(2, np.int64)
    out = np.zeros((2, 1, 8), np.float32)
    size = lib.peft_multilora_workspace_size(2, 1, 8, 8, 4, 2)
    ws = np.zeros(size + 16, np.uint8)
    base = ws.ctypes.data + (-ws.ctypes.data % 16)

    def call(dtype: int = FP32, slots: int = 2, wsp: int = base, wss: int = size, path: int = 0):
        return lib.peft_multilora_forward_path(
            dtype, x.ctypes.data, A.ctypes.data, B.ctypes.data, ids.ctypes.data,
            2, 1, 8, 8, 4, slots, out.ctypes.data, wsp, wss, None, path,
        )  # fmt: skip

    assert call() == OK
    assert call(dtype=3) == ERR_INVALID
    assert call(path=3) == ERR_INVALID
    assert call(slots=0) == ERR_INVALID
    assert call(wss=size - 1) == ERR_WORKSPACE
    assert call(wsp=base + 4) == ERR_INVALID


def test_workspace_size_never_shrinks_as_sizes_grow(lib: ctypes.CDLL) -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        dims = [int(v) for v in rng.integers(1, 5000, size=6)]
        grown = [d + int(g) for d, g in zip(dims, rng.integers(0, 3000, size=6), strict=True)]
        small = lib.peft_multilora_workspace_size(*dims)
        assert 0 < small <= lib.peft_multilora_workspace_size(*grown)
    assert lib.peft_multilora_workspace_size(-1, 1, 1, 1, 1, 1) == 0
