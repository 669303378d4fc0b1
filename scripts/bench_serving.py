#!/usr/bin/env python3
"""Serving benchmark: many clients, many LoRA adapters, three servers, one run. Prints JSON.

Sides, each an HTTP server on 127.0.0.1 spoken to through the same OpenAI chat API (SSE):
  scheduler  `peft-export serve --engine scheduler`: one batch across requests and adapters
  threads    `peft-export serve --engine threads`: one request per thread through Bundle.run
             (how the runtime served before the scheduler)
  llama      llama.cpp's llama-server with every LoRA loaded (--lora-init-without-apply) and
             chosen per request (`lora: [{"id": i, "scale": 1}]`), --parallel = clients.
             It batches only slots whose adapter sets are equal: each step decodes the
             lowest-numbered busy slot's adapter group and the other groups wait, so requests
             for 16 different adapters run about one at a time (batch-1 speed), not as one
             batch (tools/server/server-context.cpp: can_batch_with, pre_decode). Its OpenMP
             build spins up to 300,000 times at each of the ~1,000 per-node barriers of a
             step; on this shared 2-core box a busy neighbour on one core leaves the thread on
             the other spinning at every barrier (measured: 33 -> 465 ms per token), so it
             runs with GOMP_SPINCOUNT=1000 (libgomp spins only 100-1,000 times when it sees
             more threads than CPUs; same speed on an idle machine). docs/benchmarks.md has
             the probes.
Same weights precision everywhere (SmolLM2-135M-Instruct fp32; llama.cpp F32 GGUF, F32 KV),
2 threads each, greedy, `ignore_eos` so every side generates the same token count.

Load: Poisson arrivals (seeded), chat prompts of mixed lengths, an adapter drawn from a pool
of LoRA adapters per request, at most `--clients` in flight; bounded in count and time. The
same request list runs on every side, sides interleaved per repeat. Outputs are checked on
every repeat: scheduler and threads must give identical text for every request (exit 1 if
not); llama.cpp's fp32 kernels differ from ONNX Runtime's, so its text is compared and the
agreeing fraction reported (exit 1 below --min-llama-agreement).

Then the prefill-interference check on the scheduler: `--probe-rows` rows decode; the gaps
between their tokens are measured for a window without, then while a `--long-prompt`-token
prompt prefills (its submit to its first token); the p99 ratio is the goal's number.

Setup (cached under --workdir): 16 LoRA adapters derived from models/examples/pirate (its A,
B scaled and sign-flipped per adapter, seeded: each a different adapter), our runtime bundle
holding them (exported with `--ort-fusions cpu`, the fused CPU graph, unless `--ort-fusions
none`), llama.cpp built by scripts/peers/setup_llama_cpp.sh (with llama-server) and the
adapters converted by its convert_lora_to_gguf.py.

    python3 scripts/bench_serving.py [--requests 48] [--repeats 2] [--setup-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
EXAMPLE = REPO / "models" / "examples" / "pirate"
SIDES = ("scheduler", "threads", "llama")
TOPICS = [
    "the sea",
    "a lighthouse keeper",
    "bread baking",
    "the moon landing",
    "a lost key",
    "winter in the mountains",
    "a robot learning to paint",
    "an old library",
]
START_TIMEOUT_S = 300
QUIET_TOKENS = 12
"""Tokens every probe row decodes in the window without a long prompt."""
LLAMA_GOMP_SPINCOUNT = "1000"
"""llama-server's barrier spin count (see the module docstring): libgomp's default, 300,000,
assumes the cores are the server's alone."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/peft-export-peers"))
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="Requests per side per repeat.")
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--time-limit", type=float, default=300.0, help="Seconds per side run.")
    parser.add_argument("--long-prompt", type=int, default=1000)
    parser.add_argument("--probe-rows", type=int, default=8)
    parser.add_argument(
        "--step-token-budget",
        type=int,
        default=512,
        help="Scheduler: most prompt tokens one step prefills (while no row decodes).",
    )
    parser.add_argument(
        "--prefill-share",
        type=float,
        default=0.75,
        help="Scheduler: while rows decode, a prefill chunk's share of a decode call's time.",
    )
    parser.add_argument(
        "--ort-fusions",
        choices=("cpu", "none"),
        default="cpu",
        help="Our bundle's graph: ONNX Runtime's fused CPU ops (what a CPU deployment exports) "
        "or the portable one.",
    )
    parser.add_argument("--min-llama-agreement", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setup-only", action="store_true")
    args = parser.parse_args()
    sides = [s for s in args.sides.split(",") if s]
    work = args.workdir / "serving"
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        setup = set_up(args, work, sides)
    if args.setup_only:
        print(json.dumps({"setup": {k: str(v) for k, v in setup.items()}}, indent=2))
        return
    report = asyncio.run(run(args, work, sides, setup))
    print(json.dumps(report, indent=2))
    sys.exit(1 if report["failures"] else 0)


# -- setup -------------------------------------------------------------------------------


def set_up(args, work: Path, sides: list[str]) -> dict:
    from peft_export.exporter.base_model import resolve_checkpoint

    checkpoint = resolve_checkpoint("smollm2-135m")
    adapters = make_adapters(work / "adapters", args.adapters)
    out = {"checkpoint": checkpoint, "adapters": adapters}
    if {"scheduler", "threads"} & set(sides):
        out["bundle"] = our_bundle(work, adapters, args.ort_fusions)
    if "llama" in sides:
        out.update(llama_files(args, work, checkpoint, adapters))
    return out


def make_adapters(folder: Path, count: int) -> dict[str, Path]:
    """`count` LoRA adapters from the pirate example: B scaled by a factor in [0.5, 1.5] and
    every rank column's sign flipped at random (seeded), so each changes the model its own
    way while staying in the range a trained adapter has."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(EXAMPLE / "adapter_model.safetensors"))
    out = {}
    for i in range(count):
        name = f"lora{i:02d}"
        target = folder / name
        out[name] = target
        if (target / "adapter_model.safetensors").is_file():
            continue
        rng = np.random.default_rng(100 + i)
        scale = 0.5 + rng.random()
        changed = {}
        for key, value in tensors.items():
            if ".lora_B." in key:
                signs = rng.choice([-1.0, 1.0], size=value.shape[1]).astype(value.dtype)
                value = value * signs * scale
            changed[key] = np.ascontiguousarray(value)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLE / "adapter_config.json", target / "adapter_config.json")
        save_file(changed, str(target / "adapter_model.safetensors"))
    return out


def cli(*argv: str, log: Path) -> None:
    cmd = [sys.executable, "-c", "from peft_export.exporter.cli import main; main()", *argv]
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        subprocess.run(cmd, check=True, stdout=fh, stderr=fh, cwd="/tmp")


def our_bundle(work: Path, adapters: dict[str, Path], fusions: str) -> Path:
    bundle = work / ("bundle" if fusions == "none" else f"bundle-{fusions}")
    names = list(adapters)
    log = work / "setup.log"
    if not (bundle / "manifest.json").is_file():
        first = names[0]
        cli(
            "export",
            "--base",
            "smollm2-135m",
            "--mode",
            "runtime",
            "--adapter",
            f"{first}={adapters[first]}",
            "--slots",
            str(len(adapters) + 1),
            "--ort-fusions",
            fusions,
            "--out",
            str(bundle),
            "--force",
            log=log,
        )
    installed = json.loads((bundle / "manifest.json").read_text())["adapters"]["installed"]
    missing = [f"{n}={adapters[n]}" for n in names if n not in installed]
    if missing:
        cli("adapters", "add", str(bundle), *missing, log=log)
    return bundle


def llama_files(args, work: Path, checkpoint: Path, adapters: dict[str, Path]) -> dict:
    import setup_llama_cpp
    from setup_common import run_logged

    spec = setup_llama_cpp.setup("llama_cpp_f32", args.workdir, checkpoint, EXAMPLE, args.threads)
    root = args.workdir / "llama.cpp"
    server = Path(spec.env["LLAMA_CPP_LIB_PATH"]) / "llama-server"
    if not server.is_file():
        raise SystemExit(f"error: {server} was not built; see {root / 'setup.log'}")
    source = root / f"llama_cpp_python-{setup_llama_cpp.VERSION}" / "vendor" / "llama.cpp"
    python = str(root / "venv" / "bin" / "python")
    ggufs = {}
    for name, folder in adapters.items():
        target = work / "gguf" / f"{name}.gguf"
        target.parent.mkdir(exist_ok=True)
        if not target.is_file():
            convert = [python, source / "convert_lora_to_gguf.py", folder, "--base", checkpoint]
            run_logged([*convert, "--outtype", "f32", "--outfile", target], work / "setup.log")
        ggufs[name] = target
    out = {"llama_server": server, "gguf_model": Path(spec.config["model"]), "gguf_loras": ggufs}
    preload = work / "ftz_preload.so"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        source = HERE / "peers" / "ftz_preload.c"
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", preload, source], check=True)
        out["ftz_preload"] = preload
    return out


# -- servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_side(side: str, args, setup: dict, log: Path) -> tuple[subprocess.Popen, str, dict]:
    """Start one side's server; returns the process, its URL and how to name adapters."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if side in ("scheduler", "threads"):
        cmd = [sys.executable, "-c", "from peft_export.exporter.cli import main; main()"]
        cmd += ["serve", str(setup["bundle"]), "--port", str(port), "--engine", side]
        cmd += ["--threads", str(args.threads), "--max-rows", str(args.clients)]
        cmd += ["--kv-pool-tokens", str(args.clients * 1536), "--max-queue", "1024"]
        cmd += ["--step-token-budget", str(args.step_token_budget)]
        cmd += ["--prefill-share", str(args.prefill_share)]
        models = {name: name for name in setup["adapters"]}
    else:
        loras = list(setup["gguf_loras"].values())
        cmd = [str(setup["llama_server"]), "-m", str(setup["gguf_model"]), "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "-t", str(args.threads), "-tb", str(args.threads)]
        cmd += ["-np", str(args.clients), "-c", str(args.clients * 1536), "-ctk", "f32"]
        cmd += ["-ctv", "f32", "--lora-init-without-apply"]
        cmd += ["--lora", ",".join(str(lora) for lora in loras)]  # a repeated --lora is deprecated
        models = {name: i for i, name in enumerate(setup["gguf_loras"])}
        env["GOMP_SPINCOUNT"] = LLAMA_GOMP_SPINCOUNT
        if setup.get("ftz_preload"):  # ONNX Runtime flushes denormals (its default); same here
            env["LD_PRELOAD"] = str(setup["ftz_preload"])
    out = open(log, "a")  # noqa: SIM115 (closed with the process by stop_side)
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, cwd="/tmp")
    proc.log = out  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, log)
    return proc, url, models


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: a server exited ({proc.args[0]}); see {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"error: {url} not ready in {START_TIMEOUT_S} s; see {log}")


def stop_side(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()  # type: ignore[attr-defined]


# -- load ---------------------------------------------------------------------------------


def workload(args) -> list[dict]:
    """The request list every side runs: arrival offsets, prompts of mixed lengths, adapters."""
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / args.rate, size=args.requests)
    names = [f"lora{i:02d}" for i in range(args.adapters)]
    jobs = []
    for i, at in enumerate(np.cumsum(gaps)):
        topic = TOPICS[int(rng.integers(len(TOPICS)))]
        kind = int(rng.integers(3))
        if kind == 0:
            prompt = f"Say one thing about {topic}."
        elif kind == 1:
            prompt = f"Write a short poem about {topic}, with a title and two verses."
        else:
            story = " ".join(
                f"Then the story of {t} went on, step {j}." for j, t in enumerate(TOPICS)
            )
            prompt = f"Read this and summarise it in one line: {story} It ended with {topic}."
        jobs.append(
            {
                "i": i,
                "at": float(at),
                "prompt": prompt,
                "adapter": names[int(rng.integers(len(names)))],
            }
        )
    return jobs


async def one_request(client, body: dict, record: dict | None = None) -> dict:
    """Stream one chat completion; returns text, token arrival times, or the error. Token
    times go into `record["stamps"]` as they arrive, so a run cut by its time limit still
    counts what was streamed."""
    import openai

    sent = time.perf_counter()
    record = {} if record is None else record
    stamps: list[float] = record.setdefault("stamps", [])
    pieces: list[str] = []
    standard = ("model", "messages", "max_tokens", "temperature", "stream")
    extra = {k: v for k, v in body.items() if k not in standard}
    try:
        stream = await client.chat.completions.create(
            **{k: body[k] for k in standard}, extra_body=extra
        )
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    stamps.append(time.perf_counter())
                    pieces.append(choice.delta.content)
    except openai.APIError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"sent": sent, "stamps": stamps, "text": "".join(pieces), "tokens": len(stamps)}


def request_body(side: str, job: dict, models: dict, max_tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": job["prompt"]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    if side == "llama":
        lora = [{"id": models[job["adapter"]], "scale": 1.0}]
        body |= {"model": "smollm2", "lora": lora, "cache_prompt": False}
    else:
        body["model"] = models[job["adapter"]]
    return body


def make_client(url: str, args):
    import openai

    return openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="none", timeout=args.time_limit, max_retries=0
    )


async def run_load(side: str, url: str, models: dict, jobs: list[dict], args) -> dict:
    limit = asyncio.Semaphore(args.clients)
    results: dict[int, dict] = {}
    started = time.perf_counter()
    partial: dict[int, dict] = {}

    async def go(job: dict) -> None:
        """One client (one fresh loopback connection) per request, no retries: a kept-alive
        connection that the server closed while idle (llama-server's HTTP library does after
        5 s) would fail the next request that reuses it, a client-side race."""
        await asyncio.sleep(max(0.0, started + job["at"] - time.perf_counter()))
        async with limit:
            body = request_body(side, job, models, args.max_tokens)
            partial[job["i"]] = record = {}
            client = make_client(url, args)
            try:
                results[job["i"]] = await one_request(client, body, record)
            finally:
                await client.close()

    try:
        await asyncio.wait_for(asyncio.gather(*(go(j) for j in jobs)), args.time_limit)
    except TimeoutError:  # a side too slow for the limit: what it streamed still counts
        for job in jobs:
            if job["i"] not in results:
                stamps = partial.get(job["i"], {}).get("stamps", [])
                results[job["i"]] = {
                    "error": f"not finished within --time-limit {args.time_limit} s",
                    "tokens": len(stamps),
                }
    wall = time.perf_counter() - started
    return {"wall": wall, "results": results}


def summarise(run: dict) -> dict:
    ok = [r for r in run["results"].values() if "error" not in r]
    ttft = [r["stamps"][0] - r["sent"] for r in ok if r["stamps"]]
    gaps = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    tokens = sum(r.get("tokens", 0) for r in run["results"].values())

    def pct(values, q):
        return round(float(np.percentile(values, q)) * 1000, 2) if values else None

    return {
        "completed": len(ok),
        "failed": len(run["results"]) - len(ok),
        "tokens": tokens,
        "tokens_note": "streamed chunks with text (a chunk may hold more than one token), "
        "unfinished requests' included; latencies over completed requests",
        "wall_s": round(run["wall"], 3),
        "tokens_per_s": round(tokens / run["wall"], 2),
        "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
        "inter_token_ms": {"p50": pct(gaps, 50), "p99": pct(gaps, 99)},
    }


# -- prefill interference -----------------------------------------------------------------


async def interference(url: str, models: dict, args, prompt: str) -> dict:
    """Inter-token gaps of running rows without, then during, a long prompt's prefill."""
    names = list(models)
    client = make_client(url, args)
    stamps: list[list[float]] = [[] for _ in range(args.probe_rows)]
    done = asyncio.Event()

    async def row(i: int) -> None:
        stream = await client.chat.completions.create(
            model=models[names[i % len(names)]],
            messages=[{"role": "user", "content": f"Count slowly, row {i}."}],
            max_tokens=600,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps[i].append(time.perf_counter())
            if done.is_set():
                await stream.close()
                return

    rows = [asyncio.create_task(row(i)) for i in range(args.probe_rows)]
    try:
        while min(len(s) for s in stamps) < 3:
            await asyncio.sleep(0.05)
        quiet_from = time.perf_counter()
        counts = [len(s) for s in stamps]
        while any(len(s) < n + QUIET_TOKENS for s, n in zip(stamps, counts, strict=True)):
            await asyncio.sleep(0.05)
        quiet_to = long_from = time.perf_counter()
        body = {"model": models[names[0]], "messages": [{"role": "user", "content": prompt}]}
        body |= {"max_tokens": 1, "temperature": 0, "stream": True}
        first = await one_request(client, body)
        long_to = first["stamps"][0] if first.get("stamps") else time.perf_counter()
    finally:
        done.set()
        await asyncio.wait_for(asyncio.gather(*rows, return_exceptions=True), 120)
        await client.close()

    def gaps(lo: float, hi: float) -> list[float]:
        out = []
        for s in stamps:
            inside = [t for t in s if lo <= t <= hi]
            out += [b - a for a, b in zip(inside, inside[1:], strict=False)]
            before = [t for t in s if t < lo]
            after = [t for t in s if t > hi]
            if before and (inside or after):  # a row stalled across the window's start
                out.append((inside or after)[0] - before[-1])
        return out

    quiet, busy = gaps(quiet_from, quiet_to), gaps(long_from, long_to)
    p99q = float(np.percentile(quiet, 99))
    p99b = float(np.percentile(busy, 99)) if busy else None
    return {
        "rows": args.probe_rows,
        "long_prompt_tokens": args.long_prompt,
        "prefill_s": round(long_to - long_from, 3),
        "inter_token_p99_ms_without": round(p99q * 1000, 2),
        "inter_token_p99_ms_during_prefill": None if p99b is None else round(p99b * 1000, 2),
        "ratio": None if p99b is None else round(p99b / p99q, 2),
        "gaps_counted": {"without": len(quiet), "during": len(busy)},
    }


def long_prompt_text(bundle: Path, tokens: int) -> str:
    """A user message whose chat-templated prompt is about `tokens` tokens."""
    from peft_export.runtime import load_bundle

    codec = load_bundle(bundle, threads=1).codec
    words = " ".join(f"{TOPICS[i % len(TOPICS)]} {i}" for i in range(tokens))
    ids = codec.encode_messages([{"role": "user", "content": words}])
    while len(ids) > tokens:
        words = words[: int(len(words) * tokens / len(ids)) - 1]
        ids = codec.encode_messages([{"role": "user", "content": words}])
    return words


# -- the run ------------------------------------------------------------------------------


async def run(args, work: Path, sides: list[str], setup: dict) -> dict:
    jobs = workload(args)
    log = work / "servers.log"
    report: dict = {
        "model": "SmolLM2-135M-Instruct fp32 (ours: runtime bundle; llama.cpp: F32 GGUF, F32 KV)",
        "our_graph": "ONNX Runtime fused CPU ops" if args.ort_fusions == "cpu" else "portable",
        "adapters": args.adapters,
        "clients": args.clients,
        "requests_per_run": args.requests,
        "arrival_rate_per_s": args.rate,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "scheduler_step_token_budget": args.step_token_budget,
        "scheduler_prefill_share": args.prefill_share,
        "repeats": args.repeats,
        "machine": "shared with other agents (2 cores); compare ratios within this run only",
        "denormals": "flushed: ONNX Runtime's session option (ours)"
        + (
            "; llama-server: scripts/peers/ftz_preload.c via LD_PRELOAD"
            if setup.get("ftz_preload")
            else ""
        )
        + (
            "; llama-server: NOT flushed (no C compiler)"
            if "llama" in sides and not setup.get("ftz_preload")
            else ""
        ),
        **(
            {"llama_server_env": f"GOMP_SPINCOUNT={LLAMA_GOMP_SPINCOUNT} (OpenMP barrier spin)"}
            if "llama" in sides
            else {}
        ),
        "runs": {s: [] for s in sides},
        "failures": [],
    }
    servers = {}
    try:
        for side in sides:
            servers[side] = start_side(side, args, setup, log)
        for rep in range(args.repeats):
            texts = {}
            order = sides if rep % 2 == 0 else list(reversed(sides))
            for side in order:
                proc, url, models = servers[side]
                cpu = cpu_seconds(proc.pid)
                outcome = await run_load(side, url, models, jobs, args)
                summary = summarise(outcome)
                used = cpu_seconds(proc.pid) - cpu
                summary["server_cpu_s"] = round(used, 2)
                summary["tokens_per_cpu_s"] = round(summary["tokens"] / max(used, 1e-9), 2)
                report["runs"][side].append(summary)
                texts[side] = {i: r.get("text") for i, r in outcome["results"].items()}
                errors = {r["error"] for r in outcome["results"].values() if "error" in r}
                report["failures"] += [f"repeat {rep}: {side}: {e}" for e in sorted(errors)[:3]]
            check_outputs(report, rep, texts, args)
        report["summary"] = {s: median_of(report["runs"][s]) for s in sides}
        ratios = {}
        tps = {s: report["summary"][s]["tokens_per_s"] for s in sides}
        if "scheduler" in tps and "threads" in tps:
            ratios["scheduler_vs_threads"] = round(tps["scheduler"] / tps["threads"], 2)
        if "scheduler" in tps and "llama" in tps:
            ratios["scheduler_vs_llama_server"] = round(tps["scheduler"] / tps["llama"], 2)
        per_cpu = {s: report["summary"][s]["tokens_per_cpu_s"] for s in sides}
        if "scheduler" in per_cpu and "threads" in per_cpu:
            ratios["scheduler_vs_threads_per_cpu_s"] = round(
                per_cpu["scheduler"] / per_cpu["threads"], 2
            )
        if "scheduler" in per_cpu and "llama" in per_cpu:
            ratios["scheduler_vs_llama_server_per_cpu_s"] = round(
                per_cpu["scheduler"] / per_cpu["llama"], 2
            )
        report["throughput_ratios"] = ratios
        if "scheduler" in servers:
            _, url, models = servers["scheduler"]
            text = long_prompt_text(setup["bundle"], args.long_prompt)
            report["prefill_interference"] = await interference(url, models, args, text)
        report["goals"] = goals(report)
    finally:
        for proc, _, _ in servers.values():
            stop_side(proc)
    return report


def check_outputs(report: dict, rep: int, texts: dict, args) -> None:
    for side, got in texts.items():
        missing = [i for i, t in got.items() if t is None]
        if missing:
            report["failures"].append(f"repeat {rep}: {side} failed {len(missing)} requests")
    if "scheduler" in texts and "threads" in texts:
        differ = [i for i in texts["scheduler"] if texts["scheduler"][i] != texts["threads"].get(i)]
        if differ:
            report["failures"].append(
                f"repeat {rep}: scheduler and threads texts differ on requests {differ[:8]}"
            )
    if "llama" in texts:
        ours = texts.get("scheduler") or texts.get("threads")
        if ours:
            same = sum(1 for i, t in ours.items() if t is not None and t == texts["llama"].get(i))
            share = same / max(1, len(ours))
            report.setdefault("llama_agreement", []).append(round(share, 3))
            if share < args.min_llama_agreement:
                report["failures"].append(
                    f"repeat {rep}: llama-server agrees with ours on {share:.0%} of requests"
                )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc): on a shared machine the
    side with more runnable threads gets more of the CPU, so tokens per CPU-second is
    reported beside tokens per second."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_of(runs: list[dict]) -> dict:
    keys = ("tokens_per_s", "wall_s", "tokens_per_cpu_s")
    out = {k: round(float(np.median([r[k] for r in runs])), 2) for k in keys}
    for group in ("ttft_ms", "inter_token_ms"):
        out[group] = {
            q: round(float(np.median([r[group][q] for r in runs if r[group][q] is not None])), 2)
            for q in ("p50", "p99")
        }
    return out


def goals(report: dict) -> dict:
    ratios = report.get("throughput_ratios", {})
    out = {}
    if "scheduler_vs_threads" in ratios:
        out["scheduler >= 3x threads"] = ratios["scheduler_vs_threads"] >= 3
    if "scheduler_vs_llama_server" in ratios:
        out["scheduler >= 2x llama-server"] = ratios["scheduler_vs_llama_server"] >= 2
    probe = report.get("prefill_interference")
    if probe and probe["ratio"] is not None:
        out["inter-token p99 during 1k prefill <= 2x"] = probe["ratio"] <= 2
    return out


if __name__ == "__main__":
    main()
