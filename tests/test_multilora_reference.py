"""The PyTorch reference of the MultiLoRA op (gather + bmm) against an explicit loop.

The reference is what the kernels are tested and benchmarked against, so it is itself
checked here, on the CPU, against the op's definition written out row by row and token by
token in float64 numpy.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from peft_export.plugins import multilora_reference  # noqa: E402


def _loop(x: np.ndarray, A: np.ndarray, B: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], x.shape[1], B.shape[1]))
    for b in range(x.shape[0]):
        s = ids[b]
        for t in range(x.shape[1]):
            out[b, t] = B[s] @ (A[s] @ x[b, t])
    return out


def _problem(seed: int, batch: int, seq: int, k: int, n: int, r: int, slots: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, k, generator=g, dtype=torch.float64)
    A = torch.randn(slots, r, k, generator=g, dtype=torch.float64) / k**0.5
    B = torch.randn(slots, n, r, generator=g, dtype=torch.float64) / r**0.5
    A[0] = 0
    B[0] = 0
    return x, A, B


# (batch, seq, in, out, rank, slots, ids): mixed slots with slot 0 and a negative id, one
# adapter for the whole batch, decode rows, rank 1 and rank 128.
CASES = {
    "mixed": (4, 5, 64, 48, 8, 4, [0, 3, 1, -1]),
    "one_adapter": (3, 7, 40, 24, 4, 3, [2, 2, 2]),
    "decode": (6, 1, 96, 80, 16, 5, [4, 0, 1, 1, 3, 2]),
    "rank_1": (2, 3, 16, 8, 1, 2, [1, 0]),
    "rank_128": (2, 2, 130, 33, 128, 3, [1, 2]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reference_matches_the_loop(case: tuple) -> None:
    batch, seq, k, n, r, slots, ids = case
    x, A, B = _problem(len(ids) + k, batch, seq, k, n, r, slots)
    ids_t = torch.tensor(ids, dtype=torch.int64)
    expected = _loop(x.numpy(), A.numpy(), B.numpy(), np.where(ids_t < 0, ids_t + slots, ids_t))
    got64 = multilora_reference(x, A, B, ids_t)
    assert got64.shape == (batch, seq, n)
    assert np.abs(got64.numpy() - expected).max() <= 1e-12 * np.abs(expected).max()
    got32 = multilora_reference(x.float(), A.float(), B.float(), ids_t)
    assert got32.dtype == torch.float32
    assert np.abs(got32.double().numpy() - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_keeps_low_precision_dtypes(dtype: torch.dtype) -> None:
    x, A, B = _problem(0, 3, 4, 32, 16, 8, 3)
    ids = torch.tensor([1, 0, 2])
    got = multilora_reference(x.to(dtype), A.to(dtype), B.to(dtype), ids)
    assert got.dtype == dtype
    assert torch.all(got[1] == 0)
    expected = multilora_reference(x, A, B, ids)
    assert (got.double() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, peft_export.plugins; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
