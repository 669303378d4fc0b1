"""Benchmark runtime-mode LoRA on SmolLM2 (CPU, fp32) and print one JSON object.

All-linear LoRA, rank 16, random non-zero B. Measures, in one run with both sides (medians;
every session of (b) and (c) runs once untimed first, then the sides alternate within each
repeat, in reverse order every other repeat, and their ratios are medians of the
per-repeat ratios, so that drift of the machine's speed between repeats cancels). Each
side of (b) and (c) is loaded as `--sessions` separate sessions, loaded in turns, and a
repeat takes their mean: one session's decode speed depends on where its weights landed in
memory (the same merged bundle loaded three times here: up to 5% apart; reported as
`*_sessions`), which would otherwise decide a ratio of two sessions.
(a) swap latency of an adapter already in host memory (slot write; and a resident switch),
(b) decode step time runtime-LoRA / merged, (c) 8 rows with 8 adapters vs 8 rows of one
merged adapter and vs the 8 adapters one after another, (d) `adapters add` vs a full export.
ONNX Runtime runs with denormals flushed to zero (OrtOptions default) on both sides.
MultiLoRA runs the CPU kernel when libpeft_multilora_ort.so is built (plugins/multilora);
(b) and (c) then also measure the op's ONNX function body, in the same rounds.
`--ort-fusions cpu` exports both bundles as `export --ort-fusions cpu` does (ONNX Runtime's
fused ops; the MultiLoRA nodes stay), to measure what a CPU deployment would run.
Every repeat of (b) and (c) also compares the sides' greedy ids (all fp32, so they must be
equal; scripts/bench_checks.py): runtime LoRA (kernel and function body) vs the merged
bundle, the batch of 8 vs the 8 one after another, every session vs its side's first; and
adapter a0 must change the runtime bundle's ids at all. The JSON's "output_check" says what
was compared; the exit status is 1 when anything differed.

    python scripts/bench_adapters.py [--workdir DIR [--reuse]] [--tokens 32] [--threads N]
                                     [--sessions 3] [--ort-fusions cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_checks import Compare, OutputCheck, Sample, finish, rounds

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
ADAPTERS = 8
PROMPT = "Write a short story about a lighthouse keeper."


def make_lora(base, folder: Path, seed: int) -> Path:
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    return folder


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ratio(results: dict[str, list[list[float]]], top: str, bottom: str) -> float:
    """Median of the per-repeat ratios of session means (sides measured next to each other)."""
    pairs = zip(results[top], results[bottom], strict=True)
    return statistics.median(statistics.fmean(t) / statistics.fmean(b) for t, b in pairs)


def summary(results: dict[str, list[list[float]]], scale: float = 1.0) -> dict[str, object]:
    """Per side: the median over repeats of the session mean, and each session's median."""
    out: dict[str, object] = {}
    for name, repeats in results.items():
        out[name] = scale * statistics.median(statistics.fmean(r) for r in repeats)
        out[f"{name}_sessions"] = [
            scale * statistics.median(col) for col in zip(*repeats, strict=True)
        ]
    return out


def export_both(
    work: Path, runtime_dir: Path, merged_dir: Path, ort_fusions: str
) -> dict[str, float]:
    """Export the runtime bundle, add the other adapters to it, export the merged bundle:
    the timings of (d)."""
    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.graph.ort_fusions import graph_opset, ort_fusion_step
    from peft_export.exporter.pipeline import export_bundle
    from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks

    fusions = {"ort_fusions": ort_fusions}
    graph = {"post_steps": [ort_fusion_step], "opset": graph_opset(fusions)}
    base = load_base("smollm2-135m")
    loras = [make_lora(base.model, work / f"lora{i}", seed=i) for i in range(ADAPTERS)]
    export_runtime_s = timed(
        lambda: export_bundle(
            base,
            [("a0", loras[0])],
            out=runtime_dir,
            mode="runtime",
            force=True,
            planners=[plan_lora_banks],
            options={"max_rank": RANK, "slots": ADAPTERS + 1, **fusions},
            **graph,
        )
    )
    add_s = [
        timed(lambda i=i: add_adapter(runtime_dir, f"a{i}", loras[i], replace=True))
        for i in range(1, ADAPTERS)
    ]
    export_merged_s = timed(
        lambda: export_bundle(
            base, [("a0", loras[0])], out=merged_dir, force=True, options=fusions, **graph
        )
    )
    return {
        "adapters_add_median": statistics.median(add_s),
        "full_export_merged": export_merged_s,
        "full_export_runtime": export_runtime_s,
    }


def kernel_built() -> bool:
    from peft_export.plugins import ORT_OP_LIBRARY, PluginError, find_library

    try:
        find_library(ORT_OP_LIBRARY)
    except PluginError:
        return False
    return True


def load_sessions(kinds: dict[str, tuple[Path, dict]], count: int) -> dict[str, list]:
    """`count` sessions of each kind, loaded in turns (the order reversed every other turn).

    Where a session's weights land in memory depends on what was loaded before it: loading
    all of one side's sessions first made that side's decode step ~5% slower here."""
    from peft_export.runtime.session import load_bundle

    loaded: dict[str, list] = {name: [] for name in kinds}
    for turn in range(count):
        order = list(kinds) if turn % 2 == 0 else list(reversed(kinds))
        for name in order:
            path, options = kinds[name]
            loaded[name].append(load_bundle(path, **options))
    return loaded


def generated(bundle, adapters, prompts, tokens: int):
    return bundle.generate(prompts, adapters=adapters, max_new_tokens=tokens, ignore_eos=True)


def step_sample(bundle, adapters, prompts, tokens: int) -> Sample:
    """Seconds per decode step, and the ids."""
    result = generated(bundle, adapters, prompts, tokens)
    return Sample(result.decode_seconds / max(result.steps - 1, 1), result.token_ids)


def rate_sample(bundle, adapters, prompts, tokens: int) -> Sample:
    """Generated tokens per second (prefill included), and the ids."""
    result = generated(bundle, adapters, prompts, tokens)
    return Sample(
        result.new_tokens / (result.prefill_seconds + result.decode_seconds), result.token_ids
    )


def serial_sample(bundle, names: list[str], tokens: int) -> Sample:
    """Tokens per second of the adapters one request after another; the ids, a row each."""
    start = time.perf_counter()
    results = [generated(bundle, n, PROMPT, tokens) for n in names]
    seconds = time.perf_counter() - start
    return Sample(sum(r.new_tokens for r in results) / seconds, [r.token_ids[0] for r in results])


def decode_sides(runtimes, merges, bodies, tokens: int) -> tuple[dict, list[Compare]]:
    """(b): one row with adapter a0 through the runtime bundle (kernel, and function body
    where the kernel is built) and through the bundle with a0 merged: the same ids."""

    def each(bundles, adapters) -> list:
        return [lambda b=b: step_sample(b, adapters, PROMPT, tokens) for b in bundles]

    sides = {"runtime_lora": each(runtimes, "a0"), "merged": each(merges, None)}
    compares = [Compare("runtime_lora", "merged")]
    if bodies:
        sides["runtime_lora_function_body"] = each(bodies, "a0")
        compares.append(Compare("runtime_lora_function_body", "merged"))
    return sides, compares


def batch_sides(runtimes, merges, bodies, names: list[str], tokens: int) -> tuple[dict, list]:
    """(c): one row per adapter in one batch vs the same rows one request after another
    (the same ids), and vs a batch of the merged bundle (which serves names[0] only: its
    first row equals the batch's)."""
    prompts = [PROMPT] * len(names)

    def each(bundles, measure) -> list:
        return [lambda b=b: measure(b) for b in bundles]

    sides = {
        "8_adapters_one_batch": each(runtimes, lambda b: rate_sample(b, names, prompts, tokens)),
        "1_merged_adapter_batch": each(merges, lambda b: rate_sample(b, None, prompts, tokens)),
    }
    compares = [
        Compare("8_adapters_one_batch", "8_adapters_one_after_another"),
        Compare("1_merged_adapter_batch", "8_adapters_one_batch", rows=1),
    ]
    if bodies:
        sides["8_adapters_one_batch_function_body"] = each(
            bodies, lambda b: rate_sample(b, names, prompts, tokens)
        )
        compares.append(
            Compare("8_adapters_one_batch_function_body", "8_adapters_one_after_another")
        )
    sides["8_adapters_one_after_another"] = each(
        runtimes, lambda b: serial_sample(b, names, tokens)
    )
    return sides, compares


def new_check(runtime, tokens: int) -> OutputCheck:
    """The run's output check, first making sure adapter a0 changes the runtime bundle's
    ids (else a side that skipped it would still agree)."""
    check = OutputCheck(
        "greedy ids equal on every repeat (all sides fp32): runtime LoRA (kernel and function "
        "body) vs the merged bundle, one batch vs one request per adapter, and every session "
        "of a side vs its first"
    )
    check.differs(
        "adapter a0 changes the runtime bundle's ids",
        generated(runtime, "a0", PROMPT, tokens).token_ids,
        generated(runtime, None, PROMPT, tokens).token_ids,
    )
    return check


def main() -> None:
    from peft_export.runtime.adapters_provider import LoraBankProvider

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sessions", type=int, default=3, help="sessions per side of (b), (c)")
    parser.add_argument(
        "--reuse", action="store_true", help="measure the bundles in --workdir again; skips (d)"
    )
    parser.add_argument(
        "--ort-fusions",
        choices=("none", "cpu"),
        default="none",
        help="export both bundles with ONNX Runtime's fused ops (ignored with --reuse)",
    )
    args = parser.parse_args()
    if args.reuse and not args.workdir:
        parser.error("--reuse needs the --workdir of an earlier run")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-adapters-"))
    runtime_dir, merged_dir = work / "runtime", work / "merged"
    exports = None if args.reuse else export_both(work, runtime_dir, merged_dir, args.ort_fusions)
    options = {"threads": args.threads} if args.threads else {}
    kinds = {"runtime": (runtime_dir, options), "merged": (merged_dir, options)}
    if kernel_built():
        kinds["body"] = (runtime_dir, {**options, "multilora_kernel": "off"})
    loaded = load_sessions(kinds, max(1, args.sessions))
    runtimes, merges, bodies = loaded["runtime"], loaded["merged"], loaded.get("body", [])
    runtime = runtimes[0]
    if bodies and runtime.describe()["multilora"] == "onnx function body":
        raise SystemExit("the MultiLoRA CPU library is built but was not used; see describe()")
    sessions = len(runtimes)
    store = next(p for p in runtime.input_providers if isinstance(p, LoraBankProvider)).store
    names = [f"a{i}" for i in range(ADAPTERS)]
    hosted = [store.load(n) for n in names]

    write_ms = []
    for i in range(40):
        adapter, slot = hosted[i % ADAPTERS], 1 + i % ADAPTERS
        write_ms.append(1e3 * timed(lambda a=adapter, s=slot: store.write_slot(s, a)))
    for n in names:
        store.release(store.acquire([n]))
    switch_ms = [1e3 * timed(lambda n=n: store.release(store.acquire([n]))) for n in names * 5]

    check = new_check(runtime, args.tokens)
    sides, compares = decode_sides(runtimes, merges, bodies, args.tokens)
    steps = rounds(sides, 7, check, compares, case="b")
    sides, compares = batch_sides(runtimes, merges, bodies, names, args.tokens)
    batch = rounds(sides, 5, check, compares, case="c")
    report = {
        "model": "smollm2-135m",
        "precision": "fp32",
        "device": "cpu",
        "ort_fusions": runtime.manifest.graph.ort_fusions or "none",
        "lora": {"targets": "all-linear", "rank": RANK, "adapters": ADAPTERS},
        "ort": runtime.describe(),
        "multilora": runtime.describe()["multilora"],
        "denormals_as_zero": runtime.backend.options.denormals_as_zero,
        "a_swap_ms": {
            "slot_write_median": statistics.median(write_ms),
            "slot_write_p90": statistics.quantiles(write_ms, n=10)[-1],
            "resident_switch_median": statistics.median(switch_ms),
            "goal": 1.0,
        },
        "sessions_per_side": sessions,
        "b_decode_step_ms": {
            **summary(steps, scale=1e3),
            "ratio": ratio(steps, "runtime_lora", "merged"),
            **(
                {"ratio_function_body": ratio(steps, "runtime_lora_function_body", "merged")}
                if bodies
                else {}
            ),
            "goal": 1.10,
        },
        "c_batch8_tokens_per_s": {
            **summary(batch),
            "ratio_vs_merged": ratio(batch, "8_adapters_one_batch", "1_merged_adapter_batch"),
            "ratio_vs_serial": ratio(batch, "8_adapters_one_batch", "8_adapters_one_after_another"),
            **(
                {
                    "ratio_vs_merged_function_body": ratio(
                        batch, "8_adapters_one_batch_function_body", "1_merged_adapter_batch"
                    )
                }
                if bodies
                else {}
            ),
            "goal_vs_merged": 0.8,
        },
        "d_add_vs_export_s": exports,
    }
    raise SystemExit(finish(report, check))


if __name__ == "__main__":
    main()
