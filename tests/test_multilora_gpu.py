"""MultiLoRA CUDA kernels against the PyTorch reference, on a GPU (scripts/gpu_check.sh).

Accuracy bound, against the reference evaluated in float64 on the same rounded inputs:
  fp32:      max |out - ref| <= 1e-5 * max |ref|
  fp16/bf16: |out - ref| <= u * |ref| + 1e-5 * max |ref| for every element, with
             u = 2^-11 (fp16) or 2^-8 (bf16), the error of rounding an fp32-accurate sum
             once; and (over 256 elements or more) out equals the correctly rounded
             reference in >= 98% of elements, which holds only if nothing on the way (the
             intermediate v included) lost fp32 accuracy.
Needs the kernels library built (plugins/multilora, see its README); a missing one fails.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from peft_export.plugins import (  # noqa: E402
    KernelPath,
    multilora_forward,
    multilora_reference,
    workspace_size,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
PATHS = [KernelPath.PREFILL, KernelPath.DECODE]


def _problem(gen: torch.Generator, batch: int, seq: int, k: int, n: int, r: int, slots: int):
    """x, A, B in float64 on the GPU (slot 0 zero), scaled so outputs are O(1)."""
    dev = "cuda"
    x = torch.randn(batch, seq, k, generator=gen, dtype=torch.float64, device=dev)
    A = torch.randn(slots, r, k, generator=gen, dtype=torch.float64, device=dev) / k**0.5
    B = torch.randn(slots, n, r, generator=gen, dtype=torch.float64, device=dev) / r**0.5
    A[0] = 0
    B[0] = 0
    return x, A, B


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    got = out.double()
    scale = max(ref.abs().max().item(), 1e-30)
    err = (got - ref).abs()
    if out.dtype == torch.float32:
        assert err.max().item() <= 1e-5 * scale, f"fp32 relative error {err.max().item() / scale}"
        return
    bound = UNIT_ROUNDOFF[out.dtype] * ref.abs() + 1e-5 * scale
    assert bool((err <= bound).all()), f"{out.dtype}: {(err > bound).sum().item()} over the bound"
    if got.numel() >= 256:  # a fraction, so only over enough elements
        mismatch = (got != ref.to(out.dtype).double()).double().mean().item()
        assert mismatch <= 0.02, f"{out.dtype}: {mismatch:.2%} differ from the rounded reference"


def _run_and_check(x64, A64, B64, ids, dtype: torch.dtype, path: KernelPath) -> None:
    x, A, B = x64.to(dtype), A64.to(dtype), B64.to(dtype)
    out = multilora_forward(x, A, B, ids, path=path)
    torch.cuda.synchronize()
    _check(out, multilora_reference(x.double(), A.double(), B.double(), ids))


def _random_case(seed: int) -> tuple:
    """Hidden sizes (odd ones too), ranks 1..200, batch/seq layouts, slots and id patterns."""
    rng = np.random.default_rng(seed)
    k = int(rng.choice([1, 7, 64, 576, 1000, 2048, 4095, 4096]))
    n = int(rng.choice([1, 9, 128, 576, 1001, 4096]))
    r = int(rng.choice([1, 2, 7, 8, 16, 31, 64, 100, 128, 129, 200]))
    batch, seq = [(1, 1), (1, 300), (3, 17), (8, 64), (16, 5), (37, 1), (128, 1), (5, 129)][
        seed % 8
    ]
    slots = int(rng.integers(2, 12))
    pattern = seed % 4
    if pattern == 0:  # one adapter for the whole batch
        ids = np.full(batch, int(rng.integers(1, slots)))
    elif pattern == 1:  # mixed, with base-model rows
        ids = rng.integers(0, slots, batch)
    elif pattern == 2:  # negative ids count from the end
        ids = rng.integers(-slots, slots, batch)
    else:  # sorted runs, as a scheduler that groups requests would send
        ids = np.sort(rng.integers(1, slots, batch))
    return batch, seq, k, n, r, slots, ids


@pytest.mark.parametrize("seed", range(24))
def test_random_shapes_match_reference(seed: int) -> None:
    batch, seq, k, n, r, slots, ids = _random_case(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x64, A64, B64 = _problem(gen, batch, seq, k, n, r, slots)
    ids_t = torch.tensor(ids, dtype=torch.int64, device="cuda")
    for dtype in DTYPES.values():
        for path in PATHS:
            _run_and_check(x64, A64, B64, ids_t, dtype, path)


# The benchmark's shapes: decode (tokens = rows) and prefill (4096 tokens in rows).
BENCH_SHAPES = [
    (tokens, 1, 4096, 4096, r, a) for tokens in (64, 256) for r in (16, 64) for a in (1, 8, 64)
] + [(max(8, a), 4096 // max(8, a), 4096, 4096, r, a) for r in (16, 64) for a in (1, 8, 64)]


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_benchmark_shapes_match_reference(shape: tuple) -> None:
    batch, seq, k, n, r, adapters = shape
    gen = torch.Generator(device="cuda").manual_seed(batch * seq + r + adapters)
    x64, A64, B64 = _problem(gen, batch, seq, k, n, r, adapters + 1)
    ids = torch.arange(batch, device="cuda") % adapters + 1
    for dtype in (torch.float16, torch.bfloat16):
        for path in (KernelPath.AUTO, *PATHS):
            _run_and_check(x64, A64, B64, ids, dtype, path)


@pytest.mark.parametrize("path", PATHS, ids=["prefill", "decode"])
def test_base_rows_and_out_of_range_ids_give_zeros(path: KernelPath) -> None:
    gen = torch.Generator(device="cuda").manual_seed(5)
    x64, A64, B64 = _problem(gen, 6, 20, 256, 192, 16, 4)
    A64[0] = 1.0  # a non-zero slot 0 shows its rows are skipped, not multiplied
    B64[0] = 1.0
    x, A, B = x64.half(), A64.half(), B64.half()
    ids = torch.tensor([0, 4, -5, 99, 2, 0], device="cuda")
    out = multilora_forward(x, A, B, ids, path=path)
    assert bool((out[[0, 1, 2, 3, 5]] == 0).all())
    _check(out[4:5], multilora_reference(x[4:5].double(), A.double(), B.double(), ids[4:5]))


@pytest.mark.parametrize("path", PATHS, ids=["prefill", "decode"])
def test_unaligned_tensors_use_the_element_wise_loads(path: KernelPath) -> None:
    gen = torch.Generator(device="cuda").manual_seed(6)
    x64, A64, B64 = _problem(gen, 4, 9, 64, 40, 8, 3)
    # A view one element into its storage: contiguous, but not 16-byte aligned.
    storage = torch.empty(x64.numel() + 1, dtype=torch.float16, device="cuda")
    x = storage[1:].view(x64.shape)
    x.copy_(x64)
    ids = torch.tensor([1, 2, 0, 1], device="cuda")
    out = multilora_forward(x, A64.half(), B64.half(), ids, path=path)
    _check(out, multilora_reference(x.double(), A64.half().double(), B64.half().double(), ids))


def test_repeated_calls_are_bitwise_identical() -> None:
    gen = torch.Generator(device="cuda").manual_seed(7)
    x64, A64, B64 = _problem(gen, 64, 1, 4096, 4096, 64, 9)
    ids = torch.arange(64, device="cuda") % 8 + 1
    args = (x64.half(), A64.half(), B64.half(), ids)
    for path in PATHS:
        assert torch.equal(multilora_forward(*args, path=path), multilora_forward(*args, path=path))


def test_runs_on_the_current_stream_and_in_a_cuda_graph() -> None:
    gen = torch.Generator(device="cuda").manual_seed(8)
    x64, A64, B64 = _problem(gen, 32, 1, 1024, 2048, 16, 5)
    x, A, B = x64.half(), A64.half(), B64.half()
    ids = torch.zeros(32, dtype=torch.int64, device="cuda")
    out = torch.empty(32, 1, 2048, dtype=torch.float16, device="cuda")
    ws = torch.empty(workspace_size(32, 1, 1024, 2048, 16, 5), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        multilora_forward(x, A, B, ids, out=out, workspace=ws)  # warm up off the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            multilora_forward(x, A, B, ids, out=out, workspace=ws)
    torch.cuda.current_stream().wait_stream(stream)
    for pattern in (torch.arange(32) % 4 + 1, torch.full((32,), 3), torch.arange(32) % 5):
        ids.copy_(pattern)  # a replay reads the new ids: the plan is made on the device
        graph.replay()
        torch.cuda.synchronize()
        _check(out, multilora_reference(x64.half().double(), A.double(), B.double(), ids))
