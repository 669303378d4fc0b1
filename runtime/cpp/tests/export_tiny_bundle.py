"""ctest fixture: export a tiny runtime bundle and the Python runtime's greedy ids for it.

Usage: export_tiny_bundle.py OUT_DIR. Writes OUT_DIR/bundle and OUT_DIR/expected.json
({"prompts", "adapters", "max_new_tokens", "token_ids"}), computed now by the Python
runtime. Exits 77 (ctest: skipped) when the exporter's dependencies are not installed.
"""

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PROMPTS = [[1, 17, 42, 99, 5, 230, 64], [1, 50], [1, 200, 13, 99, 4]]
ADAPTERS = [None, "lora", "prefix"]
MAX_NEW = 10


def main(out: Path) -> int:
    try:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import make_adapter, save_tiny_tokenizer, tiny_model

        from peft_export.exporter.pipeline import InMemoryBase, export_bundle
        from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
        from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
        from peft_export.runtime.session import load_bundle
    except ImportError as exc:
        print(f"exporter not available ({exc}); skipping", file=sys.stderr)
        return 77
    if (out / "expected.json").is_file():
        return 0
    shutil.rmtree(out, ignore_errors=True)
    base = tiny_model("llama")
    dirs = {
        "lora": make_adapter(base, "lora", out / "adapters", name="lora", seed=3),
        "prefix": make_adapter(base, "prefix_tuning", out / "adapters", name="prefix", seed=4),
    }
    tokenizer = save_tiny_tokenizer(out / "tokenizer")
    export_bundle(
        InMemoryBase(base, tokenizer),
        list(dirs.items()),
        out=out / "bundle",
        mode="runtime",
        planners=[plan_lora_banks, plan_prompt_inputs],
        options={"prefix_max_len": 8},
    )
    bundle = load_bundle(out / "bundle", threads=1)
    ids = bundle.generate(PROMPTS, adapters=ADAPTERS, max_new_tokens=MAX_NEW).token_ids
    expected = {
        "prompts": PROMPTS,
        "adapters": ADAPTERS,
        "max_new_tokens": MAX_NEW,
        "token_ids": ids,
    }
    (out / "expected.json").write_text(json.dumps(expected))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
