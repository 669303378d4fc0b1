"""Random traffic through the scheduler vs each request alone, on any runtime bundle; prints JSON.

Requests (chat prompts of mixed lengths, one adapter each drawn from the bundle's adapters,
`--variants` rescaled copies of `--variant-of`, and the base) arrive at Poisson times from
`--clients` threads; `--cancel-share` of them are cancelled after a random delay. Afterwards
every request runs alone through `Bundle.generate`: each completed greedy response must be
identical, each cancelled one a prefix of it, and no slot may stay pinned nor KV stay
reserved. Exit status 1 when anything differs. Both sides run on the same loaded bundle, one
after the other (scheduler first), with ONNX Runtime's default options (denormals flushed).

    python scripts/scheduler_parity.py BUNDLE [--requests 200] [--variants 4 --variant-of pirate]
        [--max-rows 8] [--max-tokens 24] [--threads 2] [--clients 4] [--rate 20] [--seed 0]

With `--variants`, the bundle is first copied (hard links) into a temporary folder, so the
registered copies never change BUNDLE itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from peft_export.bundle import names
from peft_export.runtime import load_bundle
from peft_export.runtime.scheduler import Scheduler, SchedulerConfig, ServeRequest

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "What sound does a cow make?",
    "Give me one tip for staying healthy.",
    "What is two plus two?",
    "Why is the sky blue?",
]
CONTEXT = (
    "Here is some background. The harbour town had three piers, a lighthouse and a market "
    "that opened at dawn, where fishermen sold what the night had brought in. "
)


def _prompt_ids(bundle, rng: random.Random) -> list[int]:
    question = rng.choice(QUESTIONS)
    context = CONTEXT * rng.choice([0, 0, 1, 3, 8])
    return bundle.codec.encode_prompt(context + question, chat=True)


def _variants(root: Path, source: str, count: int, out: Path) -> dict[str, Path]:
    path = root / names.adapter_file(source)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    files = {}
    for k in range(count):
        scale = np.float32(0.5 + 0.25 * k)
        scaled = {n: (t * scale if n.endswith(".B") else t) for n, t in tensors.items()}
        files[f"{source}-x{k}"] = out / f"{source}-x{k}.safetensors"
        save_file(scaled, str(files[f"{source}-x{k}"]), metadata=meta)
    return files


def _traffic(scheduler, requests, rng, args):
    handles = [None] * len(requests)
    cancel = {i for i in range(len(requests)) if rng.random() < args.cancel_share}
    gaps = [rng.expovariate(args.rate) for _ in requests]

    def client(part):
        for i in part:
            time.sleep(gaps[i])
            handles[i] = scheduler.submit(requests[i])
            if i in cancel:
                threading.Timer(rng.uniform(0.0, 1.0), handles[i].cancel).start()

    threads = [
        threading.Thread(target=client, args=(list(range(k, len(requests), args.clients)),))
        for k in range(args.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [h.result(timeout=3600) for h in handles]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--variants", type=int, default=0)
    parser.add_argument("--variant-of", default="pirate")
    parser.add_argument("--max-rows", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--cancel-share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.bundle
        if args.variants:
            root = Path(tmp) / "bundle"
            shutil.copytree(args.bundle, root, copy_function=os.link)
        bundle = load_bundle(root, threads=args.threads)
        config = SchedulerConfig(
            max_rows=args.max_rows,
            kv_pool_tokens=args.max_rows * 1024,
            prefill_pool_tokens=2048,
            step_token_budget=args.budget,
            max_queue=args.requests,
        )
        scheduler = Scheduler(bundle, config)
        if args.variants:
            files = _variants(root, args.variant_of, args.variants, Path(tmp))
            scheduler.register_many(files)
        adapters = [None, *scheduler.names()]
        rng = random.Random(args.seed)
        requests = [
            ServeRequest(
                prompt_ids=_prompt_ids(bundle, rng),
                adapter=rng.choice(adapters),
                max_tokens=rng.randint(1, args.max_tokens),
                request_id=f"r{i}",
            )
            for i in range(args.requests)
        ]
        clock = time.perf_counter()
        with scheduler:
            results = _traffic(scheduler, requests, rng, args)
            wall = time.perf_counter() - clock
            for _ in range(500):
                if scheduler.idle():
                    break
                time.sleep(0.01)
            metrics = scheduler.metrics()
        pinned = scheduler.pager.store.pinned() if scheduler.pager.store else 0
        completed = [i for i, r in enumerate(results) if r.finish_reason not in ("cancelled",)]
        mismatches, prefix_errors = [], []
        clock = time.perf_counter()
        alone_tokens = 0
        for i, (request, result) in enumerate(zip(requests, results, strict=True)):
            want = bundle.generate(
                list(request.prompt_ids),
                adapters=request.adapter,
                max_new_tokens=request.max_tokens,
            ).token_ids[0]
            alone_tokens += len(want)
            if i in completed and want != result.token_ids:
                mismatches.append(request.request_id)
            if i not in completed and want[: len(result.token_ids)] != result.token_ids:
                prefix_errors.append(request.request_id)
        alone_wall = time.perf_counter() - clock
    generated = metrics["tokens"]["generated"]
    pool = metrics["kv_pool"]
    report = {
        "bundle": str(args.bundle),
        "requests": len(requests),
        "adapters": len(adapters) - 1,
        "completed": len(completed),
        "cancelled": len(requests) - len(completed),
        "errors": sum(r.finish_reason == "error" for r in results),
        "mismatched_completed": mismatches,
        "cancelled_not_a_prefix": prefix_errors,
        "after_run": {
            "slots_pinned": pinned,
            "kv_reserved_tokens": pool["reserved_tokens"],
            "kv_layout_tokens": pool["layout_tokens"],
        },
        "scheduler": {
            "wall_s": round(wall, 2),
            "generated_tokens": generated,
            "tokens_per_s": round(generated / wall, 1),
            "steps": metrics["steps"],
            "step_seconds": {k: round(v, 2) for k, v in metrics["step_seconds"].items()},
            "decode_ms_per_step": round(
                1000 * metrics["step_seconds"]["decode"] / max(1, metrics["steps"]["decode"]), 2
            ),
            "decode_fill": round(pool["decode_fill"], 3),
            "trims": pool["trims"],
            "widenings": pool["widenings"],
            "ttft_p50_s": _median(metrics["samples"].get("ttft", [])),
            "inter_token_p50_s": _median(metrics["samples"].get("inter_token", [])),
            "adapters": metrics["adapters"],
        },
        "alone": {
            "wall_s": round(alone_wall, 2),
            "generated_tokens": alone_tokens,
            "tokens_per_s": round(alone_tokens / alone_wall, 1),
            "note": "every request once, one after another (cancelled ones run to the end)",
        },
        "machine": "shared with other jobs; the two sides ran one after the other",
    }
    print(json.dumps(report, indent=1))
    bad = mismatches or prefix_errors or report["errors"] or pinned or pool["reserved_tokens"]
    return 1 if bad else 0


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 4) if values else None


if __name__ == "__main__":
    sys.exit(main())
