"""Every registry method beyond the LoRA family, in each mode the registry gives it.

merged: the exported graph (ONNX Runtime) equals PEFT's unmerged model on tiny Llama: prefill
with a left-padded row, decode through the KV cache, 16 greedy tokens (test_merged_parity's
check). The reference is PEFT's own forward, computed here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from test_merged_parity import check_parity
from tiny import MERGEABLE_METHODS, make_adapter, tiny_model

from peft_export.bundle import methods
from peft_export.exporter.pipeline import InMemoryBase, export_bundle

MERGED = [m for m in methods.merged_names() if m not in MERGEABLE_METHODS]
"""The LoRA family and IA3 run in test_merged_parity on three architectures."""


@pytest.mark.parametrize("method", MERGED)
def test_merged_export_matches_peft(tmp_path, method):
    base = tiny_model("llama")
    adapter = make_adapter(base, method, tmp_path)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    with torch.no_grad():
        ids = torch.arange(4, 12)[None]
        assert (reference(ids).logits - base(ids).logits).abs().max() > 1e-2, "adapter is a no-op"
    manifest = export_bundle(InMemoryBase(base), [("a", adapter)], out=tmp_path / "bundle")
    assert manifest.adapters.merged["method"] == method
    check_parity(tmp_path / "bundle", reference, base.config.vocab_size)
