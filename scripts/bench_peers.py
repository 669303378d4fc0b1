"""Decoding speed of peft-export next to the runtimes users pick, the LoRA applied at runtime.

SmolLM2-135M-Instruct + models/examples/pirate on every side: our bundles (export CLI, our
runtime), onnxruntime-genai (model builder, `.onnx_adapter`), llama.cpp (GGUF + LoRA GGUF),
OpenVINO GenAI (optimum-intel IR + ov_genai.Adapter) and PyTorch + PEFT unmerged, whose greedy
ids define "correct" for fp32. Batch 1, greedy, exactly --tokens new tokens, the same prompt
ids everywhere, --threads threads, denormals flushed on every side (the JSON says how).

Each side runs in its own long-lived worker process (scripts/peers/worker.py; peers in their
own virtualenvs), started one after another: load time is measured in a fresh process, its
files read through just before (a side whose files an export had evicted loaded from disk), and
peak RSS (VmHWM) is the side's own. Repeats go round-robin over the sides (reversed every
other repeat), so the machine's drift hits every side alike. Checks on every repeat: a side's
ids equal its first run's; fp32 sides equal PyTorch's; quantized sides report how many
leading tokens match PyTorch fp32 and the other sides of their precision. Prints one JSON
object; exits 1 when a check or a side fails (skipped sides do not fail).

Peers are installed, built and converted under --workdir on first use (llama.cpp's native
build takes ~10 minutes on 2 cores) and reused later; see scripts/peers/.

    python scripts/bench_peers.py [--sides a,b|default|all] [--repeats 5] [--tokens 64]
                                  [--workdir /tmp/peft-export-peers] [--setup-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS / "peers"))
sys.path.insert(0, str(SCRIPTS))

from bench_generate import EXAMPLE_ADAPTER  # noqa: E402
from setup_common import (  # noqa: E402
    HEAD_8BIT,
    OFFLINE_ENV,
    SideSkipped,
    SideSpec,
    build_ftz_helper,
    bytes_on_disk,
    read_through,
)

PROMPT = "Tell me a story about a brave mouse."
EOS_ID = 2
OURS_DEFAULT = [
    "ours_runtime_fp32",
    "ours_runtime_fp32_fused",
    "ours_merged_fp32_fused",
    "ours_runtime_int8_fused",
    "ours_merged_int8_fused",
    "ours_runtime_int4_fused",
    "ours_merged_int4_fused",
    "ours_runtime_int4h4_fused",
    "ours_merged_int4h4_fused",
    "ours_merged_fp32_fused_cpp",
    "ours_merged_int8_fused_cpp",
    "ours_runtime_int4_fused_cpp",
    "ours_merged_int4_fused_cpp",
    "ours_merged_int4h4_fused_cpp",
]
PEERS = [
    "torch_peft_fp32",
    "ort_genai_fp32",
    "ort_genai_int4",
    "openvino_fp32",
    "openvino_int8",
    "openvino_int4",
    "llama_cpp_f32",
    "llama_cpp_q8_0",
    "llama_cpp_q4_0",
]
OURS_ALL = [
    f"ours_{mode}_{precision}{fused}{runtime}"
    for mode in ("merged", "runtime")
    for precision in ("fp32", "int8", "int4", "int4h4")
    for fused in ("", "_fused")
    for runtime in ("", "_cpp")
]
RUNTIMES = {"python": "", "cpp": "_cpp"}
"""Our runtimes, by side-name suffix: goals are judged for each one on its own."""
WORKER = SCRIPTS / "peers" / "worker.py"
READY_TIMEOUT_S = 600
STEP_TIMEOUT_S = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="default", help="comma list, 'default' or 'all'")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/peft-export-peers"))
    parser.add_argument("--setup-only", action="store_true", help="install/build/convert only")
    parser.add_argument(
        "--reuse-exports",
        action="store_true",
        help="keep our bundles made by the same export command with older exporter code",
    )
    args = parser.parse_args()
    sides = select_sides(args.sides)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # setups print progress; stdout is the JSON
        report = run(args, sides)
    print(json.dumps(report, indent=2))
    sys.exit(1 if report["failures"] else 0)


def select_sides(value: str) -> list[str]:
    known = OURS_ALL + PEERS
    if value == "default":
        return OURS_DEFAULT + PEERS
    if value == "all":
        return known
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"error: unknown side(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def run(args: argparse.Namespace, names: list[str]) -> dict:
    from peft_export.exporter.base_model import resolve_checkpoint

    started = time.perf_counter()
    if not (EXAMPLE_ADAPTER / "adapter_config.json").is_file():
        sys.exit(f"error: {EXAMPLE_ADAPTER} is missing; run scripts/train_example_adapters.py")
    checkpoint = resolve_checkpoint("smollm2-135m")
    prompt_ids = chat_prompt_ids(checkpoint, PROMPT)
    report: dict = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct) + LoRA models/examples/pirate",
        "prompt": PROMPT,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.tokens,
        "batch": 1,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": machine_info(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "method": "one worker process per side, started in turn; repeats round-robin over the "
        "sides, reversed every other repeat; medians over repeats (best: the fastest repeat, "
        "the one least disturbed by other load). decode tok/s = (tokens - 1) / (time of last "
        "token - time of first token); prefill = call to first token; load = model files to a "
        "ready object in a fresh process (imports excluded, reported apart), the files read "
        "through just before so every side loads from the page cache; peak RSS = the "
        "worker's VmHWM at the end",
        "sides": {},
        "skipped": {},
        "failures": [],
    }
    ftz_lib = build_ftz_helper(args.workdir)
    specs = set_up(names, args, checkpoint, report)
    report["setup_s"] = round(time.perf_counter() - started, 1)
    if args.setup_only:
        for name, spec in specs.items():
            report["sides"][name] = {"status": "set up", **describe(spec)}
        report["wall_s"] = report["setup_s"]
        return report
    workers = start_workers(specs, args, prompt_ids, ftz_lib, report)
    runs = round_robin(workers, args.repeats, report)
    for name, worker in workers.items():
        with contextlib.suppress(WorkerFailed):
            report["sides"][name]["peak_rss_mb"] = round(worker.ask("stats")["vm_hwm_kb"] / 1024, 1)
        worker.close()
    summarize(report, runs, args.tokens)
    check(report, runs)
    add_ratios(report, runs)
    add_goals(report, runs)
    unflushed = [
        n for n, e in report["sides"].items() if e.get("denormals", {}).get("flushed") is False
    ]
    report["denormals"] = (
        f"not flushed on {', '.join(unflushed)} (see their 'denormals')"
        if unflushed
        else "flushed on every side; each side's 'denormals' says how"
    )
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def chat_prompt_ids(checkpoint: Path, prompt: str) -> list[int]:
    """The chat-templated prompt as the model's own tokenizer writes it (no extra BOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def machine_info() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def set_up(names: list[str], args, checkpoint: Path, report: dict) -> dict[str, SideSpec]:
    """Install / build / convert every side (cached in the workdir); record skips and fails."""
    import setup_llama_cpp
    import setup_openvino
    import setup_ort_genai
    import setup_ours

    specs: dict[str, SideSpec] = {}
    for name in names:
        print(f"[bench_peers] setting up {name}", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        try:
            if setup_ours.is_ours(name):
                spec = setup_ours.setup(
                    name, args.workdir, EXAMPLE_ADAPTER, args.threads, args.reuse_exports
                )
            elif name == "torch_peft_fp32":
                spec = setup_ours.setup_torch(
                    args.workdir, checkpoint, EXAMPLE_ADAPTER, args.threads
                )
            else:
                module = next(
                    m
                    for m in (setup_ort_genai, setup_openvino, setup_llama_cpp)
                    if name in m.PRECISIONS
                )
                spec = module.setup(name, args.workdir, checkpoint, EXAMPLE_ADAPTER, args.threads)
        except SideSkipped as exc:
            report["skipped"][name] = f"skipped: {exc}"
            continue
        except Exception as exc:  # any peer's install/build/convert failure fails that side
            fail(report, name, f"setup failed: {exc}")
            traceback.print_exc()
            continue
        print(f"[bench_peers] {name} ready in {time.perf_counter() - begin:.0f} s", file=sys.stderr)
        specs[name] = spec
    return specs


def describe(spec: SideSpec) -> dict:
    return {
        "peer": spec.peer,
        "precision": spec.precision,
        "settings": spec.settings,
        "model_bytes": bytes_on_disk(spec.files),
        "model_files": [str(f) for f in spec.files],
    }


def fail(report: dict, name: str, message: str) -> None:
    report["failures"].append(f"{name}: {message}")
    report["sides"].setdefault(name, {})["status"] = f"failed: {message.splitlines()[0]}"


class WorkerFailed(RuntimeError):
    """The side's worker died, timed out or answered with an error."""


class Worker:
    """One side's worker process and its JSON-lines protocol."""

    def __init__(self, spec: SideSpec, args, prompt_ids: list[int], ftz_lib: Path | None):
        self.log = args.workdir / "logs" / f"{spec.name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "module": spec.module,
            "config": spec.config,
            "prompt_ids": prompt_ids,
            "tokens": args.tokens,
            "ftz_lib": str(ftz_lib) if spec.ftz and ftz_lib else None,
        }
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(OFFLINE_ENV)
        env.update(spec.env)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [spec.python, str(WORKER), json.dumps(payload)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=args.workdir,  # never a package folder (onnxruntime-genai aborts there)
                env=env,
            )
        self.ready = self.read(READY_TIMEOUT_S)

    def ask(self, command: str) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"cmd": command}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerFailed(self.died()) from None
        return self.read(STEP_TIMEOUT_S)

    def read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise WorkerFailed(f"no answer within {timeout} s (log {self.log})")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerFailed(self.died())
        message = json.loads(line)
        if "error" in message:
            raise WorkerFailed(message["error"].strip().splitlines()[-1] + f" (log {self.log})")
        return message

    def died(self) -> str:
        self.proc.wait(timeout=30)
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
        return f"worker exited {self.proc.returncode}: {' | '.join(tail)} (log {self.log})"

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_workers(specs, args, prompt_ids, ftz_lib, report) -> dict[str, Worker]:
    """Start the workers one after another, so each loads on an otherwise idle machine."""
    workers: dict[str, Worker] = {}
    for name, spec in specs.items():
        print(f"[bench_peers] loading {name}", file=sys.stderr, flush=True)
        entry = report["sides"].setdefault(name, {})
        entry.update(describe(spec))
        read_through(spec.files)
        try:
            workers[name] = Worker(spec, args, prompt_ids, ftz_lib)
        except WorkerFailed as exc:
            fail(report, name, f"worker: {exc}")
            continue
        ready = workers[name].ready
        entry["load"] = {
            "import_s": round(ready["import_s"], 3),
            "load_s": round(ready["load_s"], 3),
            "load_to_first_token_s": round(ready["load_to_first_token_s"], 3),
        }
        entry["denormals"] = {
            "flushed": not (spec.ftz and ftz_lib is None),
            "how": ready["info"].pop("denormals", "not stated"),
            "worker_main_thread": ready["denormals_main_thread"]
            if not (spec.ftz and ftz_lib is None)
            else "could not: no C compiler to build scripts/peers/ftz.c",
        }
        entry["info"] = ready["info"]
    return workers


def round_robin(workers: dict[str, Worker], repeats: int, report: dict) -> dict[str, list[dict]]:
    """runs[side] = [first run in the fresh process, repeat 1, ...]."""
    runs = {name: [worker.ready["first_run"]] for name, worker in workers.items()}
    for repeat in range(repeats):
        order = list(workers) if repeat % 2 == 0 else list(reversed(workers))
        for name in order:
            if name not in runs:
                continue
            try:
                runs[name].append(workers[name].ask("generate"))
                speed = runs[name][-1]["decode_tokens_per_s"] or 0.0
                print(f"[bench_peers] {repeat + 1} {name}: {speed:.1f} tok/s", file=sys.stderr)
            except WorkerFailed as exc:
                fail(report, name, f"repeat {repeat + 1}: {exc}")
                del runs[name]
        print(f"[bench_peers] repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
    return runs


def summarize(report: dict, runs: dict[str, list[dict]], tokens: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = None
    with contextlib.suppress(Exception):
        from peft_export.exporter.base_model import resolve_checkpoint

        tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m"))
    for name, side_runs in runs.items():
        timed = side_runs[1:] or side_runs
        speeds = [r["decode_tokens_per_s"] for r in timed if r["decode_tokens_per_s"]]
        entry = report["sides"][name]
        entry["status"] = "ok"
        entry["decode_tokens_per_s"] = round(statistics.median(speeds), 2) if speeds else None
        entry["decode_tokens_per_s_best"] = round(max(speeds), 2) if speeds else None
        entry["decode_tokens_per_s_repeats"] = [round(s, 2) for s in speeds]
        entry["prefill_ms"] = round(1000 * statistics.median(r["prefill_s"] for r in timed), 1)
        entry["tokens_generated"] = len(side_runs[0]["ids"])
        if len(side_runs[0]["ids"]) != tokens:
            entry["note"] = f"generated {len(side_runs[0]['ids'])} tokens, not {tokens}"
        if tokenizer is not None:
            entry["text"] = tokenizer.decode(side_runs[0]["ids"])


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def check(report: dict, runs: dict[str, list[dict]]) -> None:
    """Determinism on every repeat; fp32 sides equal PyTorch; quantized sides' match lengths."""
    reference = runs.get("torch_peft_fp32", [{}])[0].get("ids")
    if reference is not None and EOS_ID in reference:
        report["eos_note"] = (
            f"PyTorch's greedy ids reach EOS at token {reference.index(EOS_ID)}; every side "
            "goes on past EOS as a plain argmax loop does (none suppresses it), so all "
            f"{len(reference)} ids are compared"
        )
    for name, side_runs in runs.items():
        entry = report["sides"][name]
        first = side_runs[0]["ids"]
        same = [r["ids"] == first for r in side_runs]
        checks: dict = {"deterministic": all(same)}
        if not all(same):
            fail(
                report,
                name,
                f"ids differ between runs (runs {[i for i, s in enumerate(same) if not s]})",
            )
        if reference is None:
            checks["vs_torch"] = "unchecked: torch_peft_fp32 did not run"
        elif entry["precision"] == "fp32":
            checks["equals_torch"] = first == reference
            checks["match_vs_torch_tokens"] = common_prefix(first, reference)
            if first != reference:
                fail(
                    report,
                    name,
                    f"fp32 ids differ from PyTorch's from token {common_prefix(first, reference)}",
                )
        else:
            checks["match_vs_torch_tokens"] = common_prefix(first, reference)
            checks["match_vs_same_precision_tokens"] = {
                other: common_prefix(first, other_runs[0]["ids"])
                for other, other_runs in runs.items()
                if other != name and report["sides"][other]["precision"] == entry["precision"]
            }
        entry["checks"] = checks
        if entry.get("status") == "ok" and any(
            f.startswith(f"{name}:") for f in report["failures"]
        ):
            entry["status"] = "failed"


def add_ratios(report: dict, runs: dict[str, list[dict]]) -> None:
    """Each of our sides against each peer side of its precision (and PyTorch): the median of
    per-repeat ratios, sides measured within the same round."""
    ratios: dict = {}
    for ours in (n for n in runs if n.startswith("ours_")):
        precision = report["sides"][ours]["precision"]
        row = {}
        for peer in (n for n in runs if not n.startswith("ours_")):
            if report["sides"][peer]["precision"] != precision and peer != "torch_peft_fp32":
                continue
            pairs = zip(runs[ours][1:], runs[peer][1:], strict=False)
            values = [
                a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                for a, b in pairs
                if a["decode_tokens_per_s"] and b["decode_tokens_per_s"]
            ]
            if values:
                row[peer] = round(statistics.median(values), 2)
        ratios[ours] = row
    report["decode_speed_ratio_ours_vs_peer"] = ratios


def add_goals(report: dict, runs: dict[str, list[dict]]) -> None:
    """The issue's goals, each with the numbers it rests on (None: a side it needs is absent).

    Per precision class (int4 with a 4-bit or an 8-bit head apart) and per runtime of ours
    (Python, C++): our fastest side against the fastest peer (median decode tok/s), our lowest
    peak RSS and load-to-first-token against the best peer's; our runtime-LoRA int4 decode step
    against our merged int4 step (median of per-round ratios); the int4 bundle's bytes against
    the fp32 bundle's."""
    sides = {n: e for n, e in report["sides"].items() if e.get("decode_tokens_per_s")}
    goals: dict = {}
    for precision in ("fp32", "int8", "int4", HEAD_8BIT):
        peers = {
            n: e
            for n, e in sides.items()
            if not n.startswith("ours_") and n != "torch_peft_fp32" and e["precision"] == precision
        }
        goals[precision] = {
            runtime: _precision_goals(
                {
                    n: e
                    for n, e in sides.items()
                    if n.startswith("ours_")
                    and e["precision"] == precision
                    and n.endswith("_cpp") == (suffix == "_cpp")
                },
                peers,
            )
            for runtime, suffix in RUNTIMES.items()
        }
    _step_and_bytes_goals(report, runs, goals)
    report["goals"] = goals


def _precision_goals(ours: dict[str, dict], peers: dict[str, dict]) -> dict | None:
    """Speed, peak RSS and load of one runtime's sides at one precision vs the peers'."""
    if not ours or not peers:
        return None
    fastest_ours = max(ours, key=lambda n: ours[n]["decode_tokens_per_s"])
    fastest_peer = max(peers, key=lambda n: peers[n]["decode_tokens_per_s"])
    speed = ours[fastest_ours]["decode_tokens_per_s"] / peers[fastest_peer]["decode_tokens_per_s"]
    rss = min(e.get("peak_rss_mb", float("inf")) for e in ours.values())
    peer_rss = min(e.get("peak_rss_mb", float("inf")) for e in peers.values())
    load = min(e["load"]["load_to_first_token_s"] for e in ours.values())
    peer_load = min(e["load"]["load_to_first_token_s"] for e in peers.values())
    return {
        "speed_vs_fastest_peer": {
            "ours": fastest_ours,
            "peer": fastest_peer,
            "ratio": round(speed, 3),
            "met": speed >= 1.0,
        },
        "peak_rss_mb": {"ours": rss, "best_peer": peer_rss, "met": rss <= peer_rss},
        "load_to_first_token_s": {
            "ours": load,
            "best_peer": peer_load,
            "met": load <= peer_load,
        },
    }


def _step_and_bytes_goals(report: dict, runs: dict[str, list[dict]], goals: dict) -> None:
    pair = ("ours_runtime_int4_fused", "ours_merged_int4_fused")
    if all(n in runs for n in pair):
        steps = [
            b["decode_tokens_per_s"] / a["decode_tokens_per_s"]
            for a, b in zip(runs[pair[0]][1:], runs[pair[1]][1:], strict=False)
            if a["decode_tokens_per_s"] and b["decode_tokens_per_s"]
        ]
        ratio = statistics.median(steps) if steps else None
        goals["runtime_int4_step_over_merged_int4_step"] = {
            "ratio": round(ratio, 3) if ratio else None,
            "goal": 1.15,
            "met": bool(ratio and ratio <= 1.15),
        }
    int4 = report["sides"].get("ours_runtime_int4_fused", {}).get("model_bytes")
    fp32 = report["sides"].get("ours_runtime_fp32_fused", {}).get("model_bytes")
    if int4 and fp32:
        goals["int4_bytes_over_fp32_bytes"] = {
            "ratio": round(int4 / fp32, 3),
            "goal": 0.3,
            "met": int4 / fp32 <= 0.3,
        }


if __name__ == "__main__":
    main()
