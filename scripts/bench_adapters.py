"""Benchmark runtime-mode LoRA on SmolLM2 (CPU, fp32) and print one JSON object.

All-linear LoRA, rank 16, random non-zero B. Measures, in one run with both sides (medians;
the sides of (b) and (c) alternate within each repeat, in reverse order every other repeat,
and their ratios are medians of the per-repeat ratios, so that drift of the machine's speed
between repeats cancels):
(a) swap latency of an adapter already in host memory (slot write; and a resident switch),
(b) decode step time runtime-LoRA / merged, (c) 8 rows with 8 adapters vs 8 rows of one
merged adapter and vs the 8 adapters one after another, (d) `adapters add` vs a full export.
ONNX Runtime runs with denormals flushed to zero (OrtOptions default) on both sides.
MultiLoRA runs the CPU kernel when libpeft_multilora_ort.so is built (plugins/multilora);
(b) and (c) then also measure the op's ONNX function body, in the same rounds.

    python scripts/bench_adapters.py [--workdir DIR] [--tokens 32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

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


def interleaved(sides: dict, repeats: int) -> dict[str, list[float]]:
    """Each side once per repeat, in reverse order every other repeat."""
    results: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            results[name].append(sides[name]())
    return results


def ratio(results: dict[str, list[float]], top: str, bottom: str) -> float:
    """Median of the per-repeat ratios (sides measured next to each other)."""
    return statistics.median(t / b for t, b in zip(results[top], results[bottom], strict=True))


def main() -> None:
    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.pipeline import export_bundle
    from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
    from peft_export.runtime.adapters_provider import LoraBankProvider
    from peft_export.runtime.session import load_bundle

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-adapters-"))
    base = load_base("smollm2-135m")
    loras = [make_lora(base.model, work / f"lora{i}", seed=i) for i in range(ADAPTERS)]
    runtime_dir, merged_dir = work / "runtime", work / "merged"
    export_runtime_s = timed(
        lambda: export_bundle(
            base,
            [("a0", loras[0])],
            out=runtime_dir,
            mode="runtime",
            force=True,
            planners=[plan_lora_banks],
            options={"max_rank": RANK, "slots": ADAPTERS + 1},
        )
    )
    add_s = [
        timed(lambda i=i: add_adapter(runtime_dir, f"a{i}", loras[i], replace=True))
        for i in range(1, ADAPTERS)
    ]
    export_merged_s = timed(
        lambda: export_bundle(base, [("a0", loras[0])], out=merged_dir, force=True)
    )
    options = {"threads": args.threads} if args.threads else {}
    runtime = load_bundle(runtime_dir, **options)
    merged = load_bundle(merged_dir, **options)
    with_kernel = runtime.describe()["multilora"] != "onnx function body"
    body = load_bundle(runtime_dir, multilora_kernel="off", **options) if with_kernel else None
    store = next(p for p in runtime.input_providers if isinstance(p, LoraBankProvider)).store
    names = [f"a{i}" for i in range(ADAPTERS)]
    hosted = [store.load(n) for n in names]

    write_ms = []
    for i in range(20):
        adapter, slot = hosted[i % ADAPTERS], 1 + i % ADAPTERS
        write_ms.append(1e3 * timed(lambda a=adapter, s=slot: store.write_slot(s, a)))
    for n in names:
        store.release(store.acquire([n]))
    switch_ms = [1e3 * timed(lambda n=n: store.release(store.acquire([n]))) for n in names * 5]

    def decode_step_s(bundle, adapters, prompts) -> tuple[float, float]:
        result = bundle.generate(
            prompts, adapters=adapters, max_new_tokens=args.tokens, ignore_eos=True
        )
        return result.decode_seconds / max(result.steps - 1, 1), result.new_tokens / (
            result.prefill_seconds + result.decode_seconds
        )

    sides = {"runtime_lora": (runtime, "a0"), "merged": (merged, None)}
    if body is not None:
        sides["runtime_lora_function_body"] = (body, "a0")
    for bundle, adapter in sides.values():
        decode_step_s(bundle, adapter, PROMPT)
    steps = interleaved(
        {name: lambda b=b, a=a: decode_step_s(b, a, PROMPT)[0] for name, (b, a) in sides.items()},
        repeats=7,
    )
    step_ms = {name: 1e3 * statistics.median(times) for name, times in steps.items()}

    def serial() -> float:
        start = time.perf_counter()
        tokens = sum(
            runtime.generate(
                PROMPT, adapters=n, max_new_tokens=args.tokens, ignore_eos=True
            ).new_tokens
            for n in names
        )
        return tokens / (time.perf_counter() - start)

    batch = {
        "8_adapters_one_batch": lambda: decode_step_s(runtime, names, [PROMPT] * ADAPTERS)[1],
        "1_merged_adapter_batch": lambda: decode_step_s(merged, None, [PROMPT] * ADAPTERS)[1],
    }
    if body is not None:
        batch["8_adapters_one_batch_function_body"] = lambda: decode_step_s(
            body, names, [PROMPT] * ADAPTERS
        )[1]
    batch["8_adapters_one_after_another"] = serial
    rounds = interleaved(batch, repeats=5)
    tps = {name: statistics.median(values) for name, values in rounds.items()}
    report = {
        "model": "smollm2-135m",
        "precision": "fp32",
        "device": "cpu",
        "lora": {"targets": "all-linear", "rank": RANK, "adapters": ADAPTERS},
        "ort": runtime.describe(),
        "multilora": runtime.describe()["multilora"],
        "denormals_as_zero": runtime.backend.options.denormals_as_zero,
        "a_swap_ms": {
            "slot_write_median": statistics.median(write_ms),
            "resident_switch_median": statistics.median(switch_ms),
            "goal": 1.0,
        },
        "b_decode_step_ms": {
            **step_ms,
            "ratio": ratio(steps, "runtime_lora", "merged"),
            **(
                {"ratio_function_body": ratio(steps, "runtime_lora_function_body", "merged")}
                if body is not None
                else {}
            ),
            "goal": 1.10,
        },
        "c_batch8_tokens_per_s": {
            **tps,
            "ratio_vs_merged": ratio(rounds, "8_adapters_one_batch", "1_merged_adapter_batch"),
            "ratio_vs_serial": ratio(
                rounds, "8_adapters_one_batch", "8_adapters_one_after_another"
            ),
            **(
                {
                    "ratio_vs_merged_function_body": ratio(
                        rounds, "8_adapters_one_batch_function_body", "1_merged_adapter_batch"
                    )
                }
                if body is not None
                else {}
            ),
            "goal_vs_merged": 0.8,
        },
        "d_add_vs_export_s": {
            "adapters_add_median": statistics.median(add_s),
            "full_export_merged": export_merged_s,
            "full_export_runtime": export_runtime_s,
        },
    }
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
