"""Decode-step cost of the DoRA/IA3 scale inputs of a default runtime bundle (SmolLM2).

Exports SmolLM2-135M + models/examples/pirate twice, as

    peft-export export --base smollm2-135m --mode runtime --adapter pirate=...            (default)
    peft-export export --base smollm2-135m --mode runtime --adapter pirate=... --methods lora

(the default graph has `out_scale` on q_proj/v_proj, one SlotScale node each; the other has
no scale inputs), then decodes greedily with the pirate adapter on both in one process, in
lock step: the two generate loops run in two threads that hand each other the turn after
every token, so each decode step of one side is timed right next to one of the other, and a
slow spell of the shared machine hits both alike. A session's decode speed also depends on
where its weights landed in memory (sessions of one bundle differ by up to ~5%,
scripts/bench_adapters.py), so each side is loaded as `--sessions` sessions, loaded in turns,
and repeat r runs session r % sessions of both sides (the side that starts alternates too).
The report has the median ms per decode step of each side and the median of the per-step
ratios over all steps. Prints one JSON object.

    python scripts/bench_scale_inputs.py [--workdir DIR [--reuse]] [--repeats 12] [--tokens 64]
                                         [--sessions 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADAPTER = REPO / "models" / "examples" / "pirate"
PROMPT = "Write a short story about a lighthouse keeper."
SIDES = {"methods_lora": ["--methods", "lora"], "default": []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep exports here")
    parser.add_argument("--reuse", action="store_true", help="reuse exports in --workdir")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--sessions", type=int, default=3, help="sessions per side")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generate")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: a waiting session's spinning pool would slow the other)",
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peft-export-scales-"))
    with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress
        report = run(args, workdir)
    print(json.dumps(report, indent=2))


def run(args: argparse.Namespace, workdir: Path) -> dict:
    from peft_export.exporter.cli import main as cli
    from peft_export.runtime import load_bundle

    for name, extra in SIDES.items():
        out = workdir / name
        if not (args.reuse and (out / "manifest.json").is_file()):
            base = ["export", "--base", "smollm2-135m", "--mode", "runtime", "--force"]
            cli([*base, "--adapter", f"pirate={ADAPTER}", *extra, "--out", str(out)])
    sessions: dict[str, list] = {name: [] for name in SIDES}
    for _ in range(args.sessions):
        for name in SIDES:
            bundle = load_bundle(workdir / name, threads=args.threads)
            bundle.generate([PROMPT], adapters=["pirate"], max_new_tokens=4)  # warm-up
            sessions[name].append(bundle)
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    by_session: dict[int, list[float]] = {i: [] for i in range(args.sessions)}
    order = list(SIDES)
    load_start = os.getloadavg()
    start = time.perf_counter()
    for repeat in range(args.repeats):
        pair = {name: sessions[name][repeat % args.sessions] for name in order}
        ms, ids = _lock_step(
            pair, order[:: 1 if repeat // args.sessions % 2 == 0 else -1], args.tokens
        )
        for name in order:
            times[name].extend(ms[name])
        pairs = zip(ms["default"], ms["methods_lora"], strict=True)
        by_session[repeat % args.sessions].extend(s / b for s, b in pairs)
    ratios = [s / b for s, b in zip(times["default"], times["methods_lora"], strict=True)]
    return {
        "model": "smollm2-135m + models/examples/pirate (LoRA r8 on q_proj, v_proj)",
        "new_tokens": args.tokens,
        "repeats": args.repeats,
        "decode_steps_per_side": len(ratios),
        "sessions_per_side": args.sessions,
        "threads": args.threads,
        "multilora": {name: s[0].describe()["multilora"] for name, s in sessions.items()},
        "ms_per_decode_step_median": {n: round(statistics.median(v), 3) for n, v in times.items()},
        "default_over_methods_lora": {
            "median_of_per_step_ratios": round(statistics.median(ratios), 4),
            "ratio_of_medians": round(
                statistics.median(times["default"]) / statistics.median(times["methods_lora"]), 4
            ),
            "quartiles_of_per_step_ratios": [round(q, 4) for q in statistics.quantiles(ratios)],
            "median_per_session_pair": [
                round(statistics.median(r), 4) for r in by_session.values() if r
            ],
        },
        "same_greedy_ids": ids["default"] == ids["methods_lora"],
        "seconds": round(time.perf_counter() - start, 1),
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }


def _lock_step(
    bundles: dict, order: list[str], tokens: int
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Run one greedy generate per bundle, taking turns token by token (`order[0]` first);
    returns each side's decode-step times (ms; the prefill is left out) and token ids."""
    turn = threading.Condition()
    state = {"turn": order[0], "done": set()}
    ms: dict[str, list[float]] = {name: [] for name in order}
    ids: dict[str, list[int]] = {}

    def wait_turn(name: str) -> None:
        with turn:
            turn.wait_for(lambda: state["turn"] == name or len(state["done"]) == len(order) - 1)

    def pass_turn(name: str, finished: bool) -> None:
        with turn:
            if finished:
                state["done"].add(name)
            state["turn"] = order[(order.index(name) + 1) % len(order)]
            turn.notify_all()

    def side(name: str) -> None:
        clock = [0.0, False]  # when this side got the turn; whether the prefill is behind

        def on_token(event) -> None:
            if clock[1]:
                ms[name].append(1000 * (time.perf_counter() - clock[0]))
            clock[1] = True
            if not event.finished:
                pass_turn(name, False)
                wait_turn(name)
                clock[0] = time.perf_counter()

        wait_turn(name)
        clock[0] = time.perf_counter()
        result = bundles[name].generate(
            [PROMPT], adapters=["pirate"], max_new_tokens=tokens, ignore_eos=True, stream=on_token
        )
        ids[name] = result.token_ids[0]
        pass_turn(name, True)

    threads = [threading.Thread(target=side, args=(name,)) for name in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ms, ids


if __name__ == "__main__":
    main()
