"""One benchmark side in its own long-lived process, driven by scripts/bench_peers.py.

Why a process per side: its load time is measured in a fresh process, its peak RSS (VmHWM)
is its own and nobody else's, and each peer runs in its own interpreter (virtualenv) with
nothing imported but its runtime. The controller sends one JSON command per line on stdin;
the worker answers one JSON line on the protocol pipe (the original stdout). Everything the
libraries print, on stdout or stderr, goes to stderr (the side's log file).

    python worker.py SPEC_JSON
    SPEC_JSON: {"module": "side_x", "config": {...}, "prompt_ids": [...], "tokens": 64,
                "ftz_lib": path or null}
    commands:  {"cmd": "generate"} -> {"ids", "prefill_s", "decode_tokens_per_s", ...}
               {"cmd": "stats"}    -> {"vm_hwm_kb", "vm_rss_kb"}
               {"cmd": "quit"}

A side module (side_*.py, next to this file) has `load(config) -> runner`, and the runner
`generate(prompt_ids, tokens) -> (ids, stamps)` where stamps[i] is time.perf_counter() when
token i was known, plus `info() -> dict` (versions, settings it applied).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path


def main() -> None:
    spec = json.loads(sys.argv[1])
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # C libraries printing on stdout must not corrupt the protocol
    sys.stdout = sys.stderr
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        serve(spec, protocol)
    except Exception:
        protocol.write(json.dumps({"error": traceback.format_exc()}) + "\n")
        raise


def serve(spec: dict, protocol) -> None:
    denormals = flush_denormals(spec.get("ftz_lib"))
    start = time.perf_counter()
    module = importlib.import_module(spec["module"])
    imported = time.perf_counter()
    runner = module.load(spec["config"])
    loaded = time.perf_counter()
    first = timed_generate(runner, spec["prompt_ids"], spec["tokens"], loaded)
    if spec.get("ftz_lib"):
        mxcsr = ctypes.CDLL(spec["ftz_lib"]).peers_mxcsr() & 0xFFFF
        denormals += f"; main thread after the first run: MXCSR {mxcsr:#06x}"
    ready = {
        "import_s": imported - start,
        "load_s": loaded - imported,
        "load_to_first_token_s": loaded - imported + first["prefill_s"],
        "first_run": first,
        "denormals_main_thread": denormals,
        "info": runner.info(),
        "pid": os.getpid(),
    }
    protocol.write(json.dumps(ready) + "\n")
    for line in sys.stdin:
        command = json.loads(line)["cmd"]
        if command == "generate":
            answer = timed_generate(runner, spec["prompt_ids"], spec["tokens"])
        elif command == "stats":
            answer = memory_stats()
        elif command == "quit":
            return
        else:
            answer = {"error": f"unknown command {command!r}"}
        protocol.write(json.dumps(answer) + "\n")


def timed_generate(runner, prompt_ids: list[int], tokens: int, start: float | None = None):
    """Prefill: call start to the first token; decode: tokens 2..N over their span."""
    start = time.perf_counter() if start is None else start
    call = time.perf_counter()
    ids, stamps = runner.generate(prompt_ids, tokens)
    end = time.perf_counter()
    decode = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {
        "ids": [int(t) for t in ids],
        "prefill_s": stamps[0] - call if stamps else None,
        "decode_s": decode,
        "decode_tokens_per_s": (len(stamps) - 1) / decode if decode > 0 else None,
        "total_s": end - start,
    }


def memory_stats() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[f"{key.lower()}_kb"] = int(value.split()[0])
    return {"vm_hwm_kb": fields.get("vmhwm_kb"), "vm_rss_kb": fields.get("vmrss_kb")}


def flush_denormals(library: str | None) -> str:
    """Set FTZ/DAZ in this (main) thread; threads the runtime creates later inherit it."""
    if not library:
        return "not touched by the worker (the runtime's own setting applies)"
    lib = ctypes.CDLL(library)
    lib.peers_flush_denormals.restype = ctypes.c_uint
    mxcsr = lib.peers_flush_denormals()
    state = "FTZ+DAZ set" if mxcsr & 0x8040 == 0x8040 else "FTZ/DAZ could not be set"
    return f"{state} (MXCSR {mxcsr:#06x}) before loading; runtime threads inherit it"


if __name__ == "__main__":
    main()
