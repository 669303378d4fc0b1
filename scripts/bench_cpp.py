"""Decode speed of the C++ runtime vs the Python runtime on SmolLM2 (one run, one JSON).

A runtime-mode SmolLM2-135M bundle with two seeded LoRA adapters (exported once into
--workdir, or given with --bundle) is decoded greedily by both runtimes on ONNX Runtime with
the same settings (threads, denormals flushed to zero on both sides, ignore_eos so both
decode the same number of tokens): batch 1 with an adapter, and a mixed batch (base and both
adapters). Per case each runtime runs once untimed (warm-up), then the repeats alternate
between the runtimes, the other one first every other repeat; the median decode tokens/s is
reported. Both run MultiLoRA through the CPU kernel when libpeft_multilora_ort.so is built,
else both run the op's function body. On every repeat the C++ runtime's greedy ids must
equal the Python runtime's (same graph, same precision; scripts/bench_checks.py), and each
adapter must change the Python runtime's ids of the prompts at all (else a runtime that
skipped it would still agree): the JSON's "output_check"; exit status 1 if it failed.

    python scripts/bench_cpp.py [--bundle DIR | --workdir DIR] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_checks import Compare, OutputCheck, Sample, finish, rounds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Why is the sky blue?",
]


def export(workdir: Path) -> Path:
    bundle = workdir / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    from smollm2_helpers import seeded_adapters

    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.pipeline import export_bundle
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks

    base = load_base("smollm2-135m")
    named = seeded_adapters(base.model, workdir)
    export_bundle(base, named, out=bundle, mode="runtime", planners=[plan_lora_banks])
    return bundle


def decode_rate(steps: int, rows: int, seconds: float) -> float:
    """Decode tokens/s: every step after the prefill yields one token per row."""
    return (steps - 1) * rows / seconds if seconds > 0 else 0.0


def python_run(python, rows: list[list[int]], names: list, args) -> Sample:
    """One greedy run of the Python runtime: decode tokens/s and the ids."""
    out = python.generate(rows, adapters=names, max_new_tokens=args.new_tokens, ignore_eos=True)
    return Sample(decode_rate(out.steps, len(rows), out.decode_seconds), out.token_ids)


def cpp_run(cpp, rows: list[list[int]], names: list, args) -> Sample:
    """One greedy run of the C++ runtime: decode tokens/s and the ids."""
    requests = [
        {"prompt_ids": r, "adapter": a, "max_new_tokens": args.new_tokens, "ignore_eos": True}
        for r, a in zip(rows, names, strict=True)
    ]
    out = cpp.generate(requests)
    rate = decode_rate(out["steps"], len(rows), out["decode_seconds"])
    return Sample(rate, [r["token_ids"] for r in out["rows"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="export the bundle here")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from test_cpp_runtime import CppRuntime, build_cpp
    from tokenizers import Tokenizer

    from peft_export.runtime.session import load_bundle

    bundle = args.bundle or export(args.workdir or Path(tempfile.mkdtemp(prefix="bench-cpp-")))
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    adapters = sorted(json.loads((bundle / "manifest.json").read_text())["adapters"]["installed"])
    python = load_bundle(bundle, threads=args.threads, denormals_as_zero=True)
    kernel = python.backend.multilora_library
    cpp = CppRuntime(
        build_cpp(),
        bundle,
        threads=args.threads,
        denormals_as_zero=True,
        multilora_library=str(kernel or ""),
    )
    cases = {
        "batch1_adapter": ([prompts[0]], [adapters[0]]),
        "mixed_batch3": (prompts, [None, *adapters[:2]]),
    }
    report: dict = {
        "model": "SmolLM2-135M (fp32, runtime mode, 2 LoRA adapters)",
        "backend": "onnxruntime CPU",
        "threads": args.threads,
        "denormals_as_zero": True,
        "multilora": python.describe()["multilora"],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "cases": {},
    }
    check = OutputCheck(
        "greedy ids of the C++ runtime equal the Python runtime's, every row, on every repeat "
        "(same bundle, fp32); each adapter changes the Python runtime's ids"
    )
    base = python_run(python, prompts, [None] * len(prompts), args).ids
    for name in adapters[:2]:  # the adapters the cases use, on all the prompts
        check.differs(
            f"adapter {name} changes the Python runtime's ids",
            python_run(python, prompts, [name] * len(prompts), args).ids,
            base,
        )
    for case, (rows, names) in cases.items():
        sides = {
            "python": [lambda rows=rows, names=names: python_run(python, rows, names, args)],
            "cpp": [lambda rows=rows, names=names: cpp_run(cpp, rows, names, args)],
        }
        rates = rounds(sides, args.repeats, check, [Compare("cpp", "python")], case=case)
        py_median = statistics.median(r[0] for r in rates["python"])
        cpp_median = statistics.median(r[0] for r in rates["cpp"])
        report["cases"][case] = {
            "rows": len(rows),
            "python_decode_tok_s": round(py_median, 2),
            "cpp_decode_tok_s": round(cpp_median, 2),
            "cpp_over_python": round(cpp_median / py_median, 3) if py_median else None,
        }
    cpp.close()
    sys.exit(finish(report, check))


if __name__ == "__main__":
    main()
