#!/usr/bin/env python3
"""Times the MultiLoRA CUDA kernels against PyTorch gather + bmm on a GPU; prints JSON.

Shapes: decode (64 and 256 tokens, one per row) and prefill (4096 tokens in rows of 512, or
64 rows of 64 for 64 adapters), hidden 4096, ranks 16 and 64, 1/8/64 adapters (slot 0 is the
base model and unused here). Each side is timed with CUDA events around single calls,
queued back to back with the L2 cache flushed before each call (every layer of a model
brings other weights), and the median is reported. Both sides get the same treatment: their
inputs, outputs and intermediates (the baseline's gathered A and B and its x @ A^T) are
allocated once, outside the timed calls. Goals: >= 10x faster than gather + bmm at decode,
>= 3x at prefill, and within 2x of the memory-bound time where the bytes the op must move
exceed 10 MB; and both sides correct: their outputs are filled with NaN before the timed
calls and checked after them against the float64 reference (scripts/bench_checks.py), the
kernel element-wise within u * |ref| + 1e-5 * max |ref| (u: the dtype's unit roundoff, the
bound tests/test_multilora_gpu.py holds it to), the baseline, which rounds x @ A^T to the
dtype, within 16 u * max |ref|. A failed check fails all_goals_met and the exit status (1).
Without a CUDA GPU it exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check.sh sets PYTHONSAFEPATH
from bench_checks import OutputCheck, finish  # noqa: E402

PEAK_TBPS = 4.3  # H200: 4.8 TB/s datasheet, ~4.3 measured for device copies
DECODE_SPEEDUP_GOAL = 10.0
PREFILL_SPEEDUP_GOAL = 3.0
BOUND_GOAL = 2.0  # at most this many times the memory-bound time...
BOUND_MIN_BYTES = 10e6  # ...where the op moves more than this
HIDDEN = 4096
L2_FLUSH_BYTES = 256 << 20
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}
BASELINE_TOLERANCE = 16  # x the unit roundoff, relative to max |ref|


def _cases() -> list[dict[str, Any]]:
    cases = []
    for rank in (16, 64):
        for adapters in (1, 8, 64):
            for tokens in (64, 256):
                cases.append(
                    dict(phase="decode", batch=tokens, seq=1, rank=rank, adapters=adapters)
                )
            rows = max(8, adapters)
            cases.append(
                dict(phase="prefill", batch=rows, seq=4096 // rows, rank=rank, adapters=adapters)
            )
    return cases


def _time_us(fn, flush, repeats: int, warmup: int, poison) -> float:
    """Median of per-call CUDA-event times, calls queued without host syncs in between;
    `poison` runs after the warm-up, so that what is checked afterwards was written by the
    timed calls."""
    import torch

    for _ in range(warmup):
        fn()
    poison()
    events: list[tuple[Any, Any]] = []
    for _ in range(repeats):
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)


def _bench_case(
    case: dict[str, Any], dtype_name: str, repeats: int, warmup: int, flush, check: OutputCheck
) -> dict[str, Any]:
    import torch

    from peft_export.plugins import multilora_forward, multilora_reference
    from peft_export.plugins import workspace_size as ws_size

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]

    batch, seq, rank, adapters = case["batch"], case["seq"], case["rank"], case["adapters"]
    slots = adapters + 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, seq, HIDDEN, generator=gen, device="cuda").to(dtype)
    A = (torch.randn(slots, rank, HIDDEN, generator=gen, device="cuda") / HIDDEN**0.5).to(dtype)
    B = (torch.randn(slots, HIDDEN, rank, generator=gen, device="cuda") / rank**0.5).to(dtype)
    A[0] = 0
    B[0] = 0
    ids = torch.arange(batch, device="cuda") % adapters + 1
    out = torch.empty(batch, seq, HIDDEN, dtype=dtype, device="cuda")
    ws = torch.empty(
        ws_size(batch, seq, HIDDEN, HIDDEN, rank, slots), dtype=torch.uint8, device="cuda"
    )

    # The baseline's buffers, allocated once like the kernel's out and workspace.
    a_rows = torch.empty(batch, rank, HIDDEN, dtype=dtype, device="cuda")
    b_rows = torch.empty(batch, HIDDEN, rank, dtype=dtype, device="cuda")
    v = torch.empty(batch, seq, rank, dtype=dtype, device="cuda")
    base_out = torch.empty(batch, seq, HIDDEN, dtype=dtype, device="cuda")

    def ours() -> None:
        multilora_forward(x, A, B, ids, out=out, workspace=ws)

    def theirs() -> None:
        """multilora_reference (gather + 2 bmm) into the preallocated buffers."""
        torch.index_select(A, 0, ids, out=a_rows)
        torch.index_select(B, 0, ids, out=b_rows)
        torch.bmm(x, a_rows.transpose(1, 2), out=v)
        torch.bmm(v, b_rows.transpose(1, 2), out=base_out)

    ours_us = _time_us(ours, flush, repeats, warmup, lambda: out.fill_(float("nan")))
    torch_us = _time_us(theirs, flush, repeats, warmup, lambda: base_out.fill_(float("nan")))
    ref = multilora_reference(x.double(), A.double(), B.double(), ids)
    rel_err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    label = "{phase} batch {batch} seq {seq} rank {rank} adapters {adapters}".format(**case)
    expected = ref.cpu().numpy()
    u = UNIT_ROUNDOFF[dtype_name]
    ours_ok = check.close(
        f"{label}: kernel", out.double().cpu().numpy(), expected, rtol=u, atol_of_max=1e-5
    )
    baseline_ok = check.close(
        f"{label}: baseline",
        base_out.double().cpu().numpy(),
        expected,
        rtol=0.0,
        atol_of_max=BASELINE_TOLERANCE * u,
    )

    e = x.element_size()
    used = min(adapters, batch)
    min_bytes = (
        batch * seq * HIDDEN * e  # read x
        + used * rank * HIDDEN * e * 2  # read A[s] and B[s] of each adapter used, once
        + batch * 8  # read adapter_ids
        + batch * seq * HIDDEN * e  # write the delta
    )
    bound_us = min_bytes / (PEAK_TBPS * 1e12) * 1e6
    speedup = torch_us / ours_us
    speedup_goal = DECODE_SPEEDUP_GOAL if case["phase"] == "decode" else PREFILL_SPEEDUP_GOAL
    bound_applies = min_bytes > BOUND_MIN_BYTES
    auto_path = "decode" if seq < 16 else "prefill"  # PEFT_ML_PATH_AUTO's rule
    return {
        **case,
        "tokens": batch * seq,
        "hidden": HIDDEN,
        "kernel_path": auto_path,
        "ours_us": round(ours_us, 2),
        "torch_us": round(torch_us, 2),
        "speedup": round(speedup, 2),
        "min_bytes": min_bytes,
        "achieved_tbps": round(min_bytes / (ours_us * 1e-6) / 1e12, 3),
        "memory_bound_us": round(bound_us, 2),
        "times_memory_bound": round(ours_us / bound_us, 2),
        "max_rel_err_vs_fp64": rel_err,
        "goals": {
            "correct": {
                "target": "kernel within u |ref| + 1e-5 max |ref| and baseline within "
                f"{BASELINE_TOLERANCE} u max |ref| of the float64 reference, u = {u:.3g}",
                "met": ours_ok and baseline_ok,
            },
            "speedup": {"target": speedup_goal, "met": speedup >= speedup_goal},
            "memory_bound": {
                "target": f"<= {BOUND_GOAL}x when min_bytes > {BOUND_MIN_BYTES:.0e}",
                "applies": bound_applies,
                "met": (ours_us <= BOUND_GOAL * bound_us) if bound_applies else None,
            },
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-flush", action="store_true", help="keep L2 warm between calls")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("bench_kernels: needs PyTorch with CUDA", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU visible; run it on a GPU machine", file=sys.stderr)
        return 2

    from peft_export.plugins import PluginError

    scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def flush() -> None:
        if not args.no_flush:
            scratch.zero_()

    check = OutputCheck(
        "every case's outputs, written by the timed calls (NaN before them), against the "
        "float64 reference: kernel within u |ref| + 1e-5 max |ref|, baseline within "
        f"{BASELINE_TOLERANCE} u max |ref|"
    )
    try:
        results = [
            _bench_case(c, args.dtype, args.repeats, args.warmup, flush, check) for c in _cases()
        ]
    except PluginError as e:
        print(f"bench_kernels: {e}", file=sys.stderr)
        return 1
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "assumed_peak_tbps": PEAK_TBPS,
        "l2_flushed_between_calls": not args.no_flush,
        "repeats": args.repeats,
        "statistic": "median of per-call CUDA event times (us)",
        "baseline": "peft_export.plugins.multilora_reference's torch gather + 2 bmm, into "
        "buffers allocated once (index_select and bmm with out=)",
        "cases": results,
        "all_goals_met": check.passed
        and all(
            r["goals"]["correct"]["met"]
            and r["goals"]["speedup"]["met"]
            and r["goals"]["memory_bound"]["met"] is not False
            for r in results
        ),
    }
    status = finish(report, check)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
