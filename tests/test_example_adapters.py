"""The example adapters shipped in models/examples/: valid, documented files (no model needed).

Loading them onto SmolLM2 (every tensor used, the answer changes in the trained style) and
the parity of their exports are checked in tests/test_smollm2.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from peft_export.bundle.safetensors_io import check_finite, read_header, read_tensors

EXAMPLES = Path(__file__).resolve().parents[1] / "models" / "examples"
PEFT_TYPES = {
    "pirate": "LORA",
    "shouty": "LORA",
    "french-greeting": "IA3",
    "prefix-pirate": "PREFIX_TUNING",
    "prompt-pirate": "PROMPT_TUNING",
    "minilm-sentiment": "LORA",
    "minilm-topic": "LORA",
}
LABELED = ("minilm-sentiment", "minilm-topic")
"""Classifiers: their folder also holds labels.json (the head's id2label)."""
MAX_BYTES = 4_000_000


def _config(name: str) -> dict:
    return json.loads((EXAMPLES / name / "adapter_config.json").read_text())


def test_every_example_is_documented():
    shipped = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())
    assert shipped == sorted(PEFT_TYPES)
    readme = (EXAMPLES / "README.md").read_text()
    for name in PEFT_TYPES:
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("name", sorted(PEFT_TYPES))
def test_adapter_files_are_valid(name: str):
    folder = EXAMPLES / name
    labels = ["labels.json"] if name in LABELED else []
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        *labels,
    ]
    config = _config(name)
    assert config["peft_type"] == PEFT_TYPES[name]
    labeled = name in LABELED
    assert config["task_type"] == ("SEQ_CLS" if labeled else "CAUSAL_LM")
    assert config["base_model_name_or_path"] == ("all-minilm-l6-v2" if labeled else "smollm2-135m")
    assert config.get("use_dora", False) == (name == "shouty")
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size < MAX_BYTES
    header = read_header(weights)
    assert {info.dtype for info in header.tensors.values()} == {"F32"}
    tensors = read_tensors(weights, header)
    check_finite(weights, tensors)
    for tensor_name, array in tensors.items():
        assert np.abs(array).max() > 0, f"{tensor_name} is all zeros: untrained?"
