"""ctest fixture: tiny bundles and the Python runtime's greedy ids for them, made afresh.

Usage: export_tiny_bundle.py OUT_DIR. Empties OUT_DIR, then writes one folder per bundle and
OUT_DIR/expected.json: {"prompts", "max_new_tokens", "bundles": [{"name", "adapters",
"runs": [{"quant_accuracy", "token_ids"}]}]}, where a run's ids come from the Python runtime
at that ONNX Runtime accuracy level (-1: the bundle's own). The bundles: "bundle" (float,
runtime adapters LoRA and prefix tuning), "int4-runtime" (int4 base, two LoRA adapters) and
"int8-merged" (int8 base with a LoRA merged in). "encoder" is a tiny BERT classifier with two
LoRA adapters whose heads have different label sets; expected.json's "encoder" holds rows
{"input_ids", "adapter", "labels", "logits"} with PyTorch/PEFT's logits for each row's adapter.

Nothing is kept from an earlier run: a bundle or expected.json left in a reused build folder
was made by older code, and comparing with it would hide a change in either runtime.
Exits 77 (ctest: skipped) with OUT_DIR empty when the exporter's dependencies are missing.
"""

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [[1, 17, 42, 99, 5, 230, 64], [1, 50], [1, 200, 13, 99, 4]]
MAX_NEW = 10
LEVELS = [-1, 4, 1]
"""Quantized bundles run at their own level (4, int8 activations), 4 and 1 (float32)."""


def main(out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import make_adapter, save_tiny_tokenizer, tiny_model

        from peft_export.exporter.pipeline import InMemoryBase, export_bundle
        from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
        from peft_export.exporter.quantize.scheme import QuantScheme
        from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
        from peft_export.runtime.session import load_bundle
    except ImportError as exc:
        print(f"exporter not available ({exc}); skipping", file=sys.stderr)
        return 77
    base = tiny_model("llama")
    work = out / "sources"
    lora = make_adapter(base, "lora", work / "adapters", name="lora", seed=3)
    prefix = make_adapter(base, "prefix_tuning", work / "adapters", name="prefix", seed=4)
    lora2 = make_adapter(base, "lora", work / "adapters", name="lora2", seed=5)
    model = InMemoryBase(base, save_tiny_tokenizer(work / "tokenizer"))
    runtime = {"mode": "runtime", "planners": [plan_lora_banks, plan_prompt_inputs]}
    export_bundle(
        model,
        [("lora", lora), ("prefix", prefix)],
        out=out / "bundle",
        options={"prefix_max_len": 8},
        **runtime,
    )
    export_bundle(
        model,
        [("lora", lora), ("lora2", lora2)],
        out=out / "int4-runtime",
        quantize=QuantScheme.parse("int4"),
        **runtime,
    )
    export_bundle(
        model, [("lora", lora)], out=out / "int8-merged", quantize=QuantScheme.parse("int8")
    )
    cases = [
        ("bundle", [None, "lora", "prefix"], [-1]),
        ("int4-runtime", [None, "lora", "lora2"], LEVELS),
        ("int8-merged", [None, None, None], LEVELS),
    ]
    bundles = []
    for name, adapters, levels in cases:
        runs = []
        for level in levels:
            python = load_bundle(out / name, threads=1, quant_accuracy=None if level < 0 else level)
            ids = python.generate(PROMPTS, adapters=adapters, max_new_tokens=MAX_NEW).token_ids
            runs.append({"quant_accuracy": level, "token_ids": ids})
        bundles.append({"name": name, "adapters": adapters, "runs": runs})
    expected = {
        "prompts": PROMPTS,
        "max_new_tokens": MAX_NEW,
        "bundles": bundles,
        "encoder": encoder_bundle(out / "encoder", work / "encoder"),
    }
    staged = out / "expected.json.partial"
    staged.write_text(json.dumps(expected))
    staged.rename(out / "expected.json")
    return 0


ENCODER_ADAPTERS = {"sentiment": ["negative", "positive"], "topic": ["sport", "food", "film"]}
ENCODER_ROWS = ["sentiment", "topic", None, "topic"]


def encoder_bundle(out: Path, work: Path) -> list[dict]:
    """A runtime encoder bundle at `out` and, per row, PEFT's logits for the row's adapter."""
    from encoder_tiny import SENTENCES, make_encoder_adapter, peft_outputs, save_tiny_encoder

    from peft_export.exporter.encoders.export import export_encoder
    from peft_export.runtime.session import load_bundle

    task = "sequence-classification"
    base = save_tiny_encoder("bert", task, work / "base")
    dirs = {
        name: make_encoder_adapter(
            base, "bert", task, work / name, num_labels=len(labels), labels=labels, seed=seed
        )
        for seed, (name, labels) in enumerate(ENCODER_ADAPTERS.items(), start=1)
    }
    export_encoder(base, list(dirs.items()), out=out, mode="runtime")
    encoded = load_bundle(out, threads=1).encode(SENTENCES[: len(ENCODER_ROWS)])
    rows = []
    for i, adapter in enumerate(ENCODER_ROWS):
        labels = ENCODER_ADAPTERS[adapter] if adapter else None
        logits = peft_outputs(
            base,
            "bert",
            task,
            dirs[adapter] if adapter else None,
            encoded,
            num_labels=len(labels) if labels else None,
        )["logits"][i]
        n = int(encoded.attention_mask[i].sum())
        rows.append(
            {
                "input_ids": encoded.input_ids[i, :n].tolist(),
                "adapter": adapter,
                "labels": labels or ["LABEL_0", "LABEL_1"],
                "logits": logits.tolist(),
            }
        )
    return rows


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
