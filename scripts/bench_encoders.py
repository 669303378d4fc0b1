"""Encoder speed: all-MiniLM-L6-v2 + the example LoRA classifiers, batch 1 and 32 at 128 tokens.

Sides, each with the same token ids and `--threads` CPU threads, in one process, repeats
interleaved (order reversed every other repeat):
- torch: PyTorch + PEFT, the sentiment adapter unmerged (what a PEFT user runs);
- optimum: optimum-onnx's ONNX export of the merged model (PEFT merge_and_unload, saved as a
  plain checkpoint) on ONNX Runtime; optimum-onnx needs transformers 4.x, so it is installed
  into its own virtualenv under --work and only the export runs there;
- ours-merged: our merged bundle (sentiment folded in);
- ours-runtime: our runtime bundle serving both adapters, every row on sentiment;
  both exported with `--ort-fusions cpu` (ONNX Runtime's fused CPU ops) unless
  `--ort-fusions none` asks for the portable graphs;
- ours-mixed (batch 32): the same runtime bundle, rows alternating sentiment / topic.
Every side's logits are checked against PyTorch/PEFT's on every repeat (labels identical,
values within 1e-3 of the largest logit; mixed rows against each row's own adapter); the
script exits 1 on any mismatch. Denormals are flushed on every side (torch.set_flush_denormal,
ONNX Runtime's session.set_denormal_as_zero).

    python scripts/bench_encoders.py --repeats 5 --threads 2 [--ort-fusions cpu|none]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "scripts" / "peers"))

from bench_checks import OutputCheck, finish  # noqa: E402
from setup_common import stamp_matches, write_stamp  # noqa: E402

BASE = "all-minilm-l6-v2"
ADAPTERS = {
    "sentiment": REPO / "models/examples/minilm-sentiment",
    "topic": REPO / "models/examples/minilm-topic",
}
OPTIMUM_REQUIREMENTS = ["optimum-onnx==0.1.0"]
SEQ = 128
SETTLE_S = 0.5
"""Pause before each timed call: the previous side's thread pools (ONNX Runtime's spinning
workers, PyTorch's OpenMP threads) stop spinning instead of stealing the 2 cores."""
GOALS = {"vs_torch": 2.0, "vs_optimum": 1.0, "mixed_vs_merged": 0.8}
_TEXT = """the committee met on tuesday to discuss the budget for the new stadium while fans
outside argued about the coach the food trucks and the price of tickets for the final"""
WORDS = _TEXT.split()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/peft-export/bench-enc")
    parser.add_argument("--ort-fusions", choices=("cpu", "none"), default="cpu")
    args = parser.parse_args()

    import torch

    load = list(os.getloadavg())
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    args.work.mkdir(parents=True, exist_ok=True)
    setup = prepare(args.work, args.threads, args.ort_fusions)
    check = OutputCheck(
        "each side's logits vs PyTorch/PEFT on every repeat: argmax identical, |diff| <= 1e-3 x "
        "max |logit|; mixed rows vs their own adapter's PyTorch/PEFT logits"
    )
    cases = {}
    for batch in (1, 32):
        cases[f"batch{batch}"] = run_case(setup, batch, args.repeats, args.threads, check)
    report = {
        "benchmark": "bench_encoders",
        "model": f"{BASE} + LoRA r=8 (query, value) + classifier head",
        "sequence": SEQ,
        "threads": args.threads,
        "repeats": args.repeats,
        "denormals": "flushed on every side",
        "ours_ort_fusions": args.ort_fusions,
        "ours_exported_with": f"exporter code {setup['code']}",
        "load_average": {"start": load, "end": list(os.getloadavg())},
        "host": platform.platform(),
        "cpus": os.cpu_count(),
        "note": "machine shared with other jobs; compare ratios within this run only",
        "cases": cases,
        "goals": goals(cases),
    }
    return finish(report, check)


def _exported_with(bundle: Path, code: str) -> bool:
    """The bundle exists and was exported by this checkout's exporter code (stale bundles
    of an earlier exporter would measure that exporter's graph); the peers' stamp file."""
    return (bundle / "manifest.json").is_file() and stamp_matches(bundle, code)


def prepare(work: Path, threads: int, fusions: str) -> dict[str, Any]:
    """Export our bundles, the merged checkpoint and optimum's ONNX once (cached in `work`,
    one pair of bundles per `fusions` setting; ours again when the exporter code changed)."""
    import json

    from peft import PeftModel
    from setup_ours import code_version
    from transformers import AutoModelForSequenceClassification

    from peft_export.exporter.encoders.export import encoder_checkpoint, export_encoder
    from peft_export.runtime import load_bundle

    folder = encoder_checkpoint(BASE)
    code = code_version()
    merged_bundle = work / f"ours-merged-{fusions}"
    runtime_bundle = work / f"ours-runtime-{fusions}"
    if not _exported_with(merged_bundle, code):
        export_encoder(
            BASE,
            [("sentiment", ADAPTERS["sentiment"])],
            out=merged_bundle,
            options={"ort_fusions": fusions},
            force=True,
        )
        write_stamp(merged_bundle, code)
    if not _exported_with(runtime_bundle, code):
        export_encoder(
            BASE,
            list(ADAPTERS.items()),
            out=runtime_bundle,
            mode="runtime",
            options={"methods": "lora", "ort_fusions": fusions},
            force=True,
        )
        write_stamp(runtime_bundle, code)
    references = {}
    for name, path in ADAPTERS.items():
        labels = len(json.loads((path / "labels.json").read_text()))
        base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=labels)
        references[name] = PeftModel.from_pretrained(base, path).eval()
    merged_hf = work / "merged-hf"
    if not (merged_hf / "model.safetensors").is_file():
        base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        merged = PeftModel.from_pretrained(base, ADAPTERS["sentiment"]).merge_and_unload()
        merged.save_pretrained(merged_hf)
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (folder / file).is_file():
                shutil.copyfile(folder / file, merged_hf / file)
    optimum_onnx = export_optimum(work, merged_hf)
    return {
        "torch": references,
        "merged": load_bundle(merged_bundle, threads=threads),
        "runtime": load_bundle(runtime_bundle, threads=threads),
        "optimum_path": optimum_onnx,
        "code": code,
    }


def export_optimum(work: Path, merged_hf: Path) -> Path:
    from setup_common import run_logged, venv_python

    out = work / "optimum-onnx"
    if (out / "model.onnx").is_file():
        return out / "model.onnx"
    log = work / "optimum-setup.log"
    python = venv_python(work / "optimum-venv", OPTIMUM_REQUIREMENTS, log)
    run_logged(
        [
            python,
            "-m",
            "optimum.commands.optimum_cli",
            "export",
            "onnx",
            "--model",
            merged_hf,
            "--task",
            "text-classification",
            out,
        ],
        log,
    )
    return out / "model.onnx"


def run_case(setup: dict, batch: int, repeats: int, threads: int, check: OutputCheck) -> dict:
    import onnxruntime as ort
    import torch

    merged, runtime = setup["merged"], setup["runtime"]
    texts = [" ".join(WORDS[i % 7 :] + WORDS * 5) for i in range(batch)]
    encoded = merged.encode(texts, max_length=SEQ, pad_to=SEQ)
    assert encoded.attention_mask.all(), "every row must fill all 128 tokens"
    feeds = {
        "input_ids": encoded.input_ids,
        "attention_mask": encoded.attention_mask,
        "token_type_ids": encoded.token_type_ids,
    }
    tensors = {k: torch.tensor(v) for k, v in feeds.items()}
    with torch.inference_mode():
        expected = {n: m(**tensors).logits.numpy() for n, m in setup["torch"].items()}
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = threads
    session_options.inter_op_num_threads = 1
    session_options.add_session_config_entry("session.set_denormal_as_zero", "1")
    optimum = ort.InferenceSession(str(setup["optimum_path"]), session_options)
    optimum_inputs = {i.name for i in optimum.get_inputs()}
    mixed_rows = ["sentiment" if i % 2 == 0 else "topic" for i in range(batch)]

    def torch_side() -> np.ndarray:
        with torch.inference_mode():
            return setup["torch"]["sentiment"](**tensors).logits.numpy()

    sides: dict[str, Callable[[], np.ndarray]] = {
        "torch": torch_side,
        "optimum": lambda: optimum.run(
            ["logits"], {k: v for k, v in feeds.items() if k in optimum_inputs}
        )[0],
        "ours-merged": lambda: merged.run(encoded, "sentiment")["logits"],
        "ours-runtime": lambda: runtime.run(encoded, "sentiment")["logits"],
    }
    if batch > 1:
        sides["ours-mixed"] = lambda: runtime.run(encoded, mixed_rows)["logits"]
    for side in sides.values():  # warm up
        side()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            logits = sides[name]()
            times[name].append(time.perf_counter() - start)
            rows = mixed_rows if name == "ours-mixed" else ["sentiment"] * batch
            for row, adapter in enumerate(rows):
                want = expected[adapter][row]
                got = np.asarray(logits[row][: want.shape[0]])
                label = f"batch{batch} {name} row {row} ({adapter})"
                check.close(label, got, want, rtol=0.0, atol_of_max=1e-3, repeat=repeat)
                check.ids(label + " label", [[int(got.argmax())]], [[int(want.argmax())]])
    medians = {name: statistics.median(values) for name, values in times.items()}
    result: dict[str, Any] = {
        "median_ms": {k: round(v * 1e3, 2) for k, v in medians.items()},
        "all_ms": {k: [round(x * 1e3, 2) for x in v] for k, v in times.items()},
        "rows_per_s": {k: round(batch / v, 1) for k, v in medians.items()},
    }
    for ours in ("ours-merged", "ours-runtime"):
        result[f"{ours}_vs_torch"] = round(medians["torch"] / medians[ours], 2)
        result[f"{ours}_vs_optimum"] = round(medians["optimum"] / medians[ours], 2)
    if "ours-mixed" in medians:
        result["mixed_vs_merged"] = round(medians["ours-merged"] / medians["ours-mixed"], 2)
    return result


def goals(cases: dict[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case, result in cases.items():
        for ours in ("ours-merged", "ours-runtime"):
            for key in ("vs_torch", "vs_optimum"):
                value = result[f"{ours}_{key}"]
                out[f"{case} {ours} {key}"] = {
                    "ratio": value,
                    "goal": GOALS[key],
                    "met": value >= GOALS[key],
                }
        if "mixed_vs_merged" in result:
            value = result["mixed_vs_merged"]
            out[f"{case} mixed_vs_merged"] = {
                "ratio": value,
                "goal": GOALS["mixed_vs_merged"],
                "met": value >= GOALS["mixed_vs_merged"],
            }
    return out


if __name__ == "__main__":
    sys.exit(main())
