"""What one decode step of the scheduler's KV pool costs, on any bundle; prints JSON.

The graph takes one past length P for all rows, so a batch of rows of different lengths
computes rows x P positions. Sides, each a decode step of the same `--rows` prompts (chat
prompts of mixed lengths) after the same prefill, repeated `--repeats` times interleaved:

- `batch`: all rows in one decode call (the scheduler's layout; fill = attended / computed);
- `padded`: the same batch widened so P doubles (fill halves): what padding costs;
- `one_by_one`: each row alone in its own pool, one call per row (no batching).

Every repeat checks that each row's logits agree across the sides (max abs difference
<= 1e-4, same argmax); exit status 1 otherwise. Medians of per-repeat ratios are reported.

    python scripts/scheduler_step_cost.py BUNDLE [--rows 8] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from peft_export.runtime import load_bundle
from peft_export.runtime.scheduler.batch_runner import BatchRunner
from peft_export.runtime.scheduler.paging import RowAdapter

QUESTION = "What is the capital of France?"
CONTEXT = "The harbour town had three piers, a lighthouse and a market that opened at dawn. "


def _runner(bundle, rows: int) -> BatchRunner:
    return BatchRunner(
        bundle,
        max_rows=rows,
        kv_pool_tokens=rows * 4096,
        prefill_pool_tokens=4096,
        step_token_budget=4096,
    )


def _prefilled(bundle, prompts: list[list[int]], row_ids: list[int]) -> tuple[BatchRunner, list]:
    """A runner whose pool holds `prompts` (prefilled one by one) and their first tokens."""
    runner = _runner(bundle, len(prompts))
    firsts = []
    for row_id, ids in zip(row_ids, prompts, strict=True):
        group = runner.new_group([row_id], [ids], [RowAdapter(None)])
        logits = None
        while logits is None:
            logits = runner.prefill(group)
        runner.join_decode(group, 0)
        firsts.append(int(np.argmax(logits[0])))
    return runner, firsts


def _step(runner: BatchRunner, tokens: list[int]) -> tuple[float, np.ndarray]:
    slots = np.zeros(len(tokens), dtype=np.int64)
    clock = time.perf_counter()
    logits = runner.decode(np.array(tokens, dtype=np.int64), slots)
    return time.perf_counter() - clock, logits.copy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle, threads=args.threads)
    prompts = [
        bundle.codec.encode_prompt(CONTEXT * (1 + 3 * (i % 4)) + QUESTION, chat=True)
        for i in range(args.rows)
    ]
    ids = list(range(args.rows))
    batch, firsts = _prefilled(bundle, prompts, ids)
    padded, _ = _prefilled(bundle, prompts, ids)
    padded.pool._widen(2 * padded.pool.past)
    alone = [_prefilled(bundle, [p], [0])[0] for p in prompts]
    tokens = list(firsts)
    times: dict[str, list[float]] = {"batch": [], "padded": [], "one_by_one": []}
    fills: dict[str, list[float]] = {"batch": [], "padded": []}
    worst = 0.0
    agree = True
    for repeat in range(args.repeats):
        order = ["batch", "padded", "one_by_one"]
        outputs = {}
        for side in order if repeat % 2 == 0 else reversed(order):
            if side == "one_by_one":
                took, rows = 0.0, []
                for runner, token in zip(alone, tokens, strict=True):
                    seconds, logits = _step(runner, [token])
                    took += seconds
                    rows.append(logits[0])
                outputs[side] = np.stack(rows)
            else:
                runner = batch if side == "batch" else padded
                pool = runner.pool
                fills[side].append(
                    (sum(pool.lengths) + len(pool.rows)) / (len(pool.rows) * (pool.past + 1))
                )
                took, outputs[side] = _step(runner, tokens)
            times[side].append(took)
        for side in ("padded", "one_by_one"):
            diff = float(np.abs(outputs[side] - outputs["batch"]).max())
            worst = max(worst, diff)
            same = (outputs[side].argmax(-1) == outputs["batch"].argmax(-1)).all()
            agree = agree and diff <= 1e-4 and bool(same)
        tokens = [int(t) for t in outputs["batch"].argmax(-1)]
    ratio = {
        f"{side}_over_batch": round(
            statistics.median(t / b for t, b in zip(times[side], times["batch"], strict=True)), 2
        )
        for side in ("padded", "one_by_one")
    }
    report = {
        "bundle": str(args.bundle),
        "rows": args.rows,
        "prompt_tokens": [len(p) for p in prompts],
        "threads": args.threads,
        "decode_ms_median": {k: round(1000 * statistics.median(v), 1) for k, v in times.items()},
        "fill_median": {k: round(statistics.median(v), 3) for k, v in fills.items()},
        **ratio,
        "max_abs_logit_diff": worst,
        "outputs_agree": agree,
        "machine": "shared with other jobs; ratios are medians of interleaved repeats",
    }
    print(json.dumps(report, indent=1))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
