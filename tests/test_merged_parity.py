"""Merged-mode parity: the exported graph (run in ORT) against PEFT's unmerged PyTorch model.

Each (architecture, method) exports once and checks prefill (with a left-padded row), eight
decode steps through the KV cache, and 16 greedy tokens. The reference is computed here,
from PEFT's own forward without a cache, so the test fails if export or merge is wrong.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ort_graph import OrtGraph
from peft import PeftModel
from tiny import ARCHS, MERGEABLE_METHODS, make_adapter, save_tiny_tokenizer, tiny_model

from peft_export.exporter.pipeline import InMemoryBase, export_bundle

ATOL = 1e-4
PAD = 2
UNSUPPORTED = {("gpt2", "loha"), ("gpt2", "lokr")}
"""PEFT itself cannot create LoHa/LoKr on GPT-2's Conv1D layers."""


def _cases():
    for arch in ARCHS:
        for method in MERGEABLE_METHODS:
            marks = []
            if (arch, method) in UNSUPPORTED:
                marks.append(pytest.mark.skip(reason="PEFT has no LoHa/LoKr for Conv1D"))
            yield pytest.param(arch, method, id=f"{arch}-{method}", marks=marks)


def _reference_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def _greedy_reference(model: torch.nn.Module, ids: np.ndarray, steps: int) -> np.ndarray:
    seq = torch.as_tensor(ids)
    with torch.no_grad():
        for _ in range(steps):
            token = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], dim=1)
    return seq[:, ids.shape[1] :].numpy()


def check_parity(
    bundle, reference: torch.nn.Module, vocab: int, seed: int = 0, initializers=None
) -> None:
    """Prefill (one left-padded row), 8 decode steps and 16 greedy tokens of the bundle's
    graph (with `initializers` replacing its weights of those names) against `reference`."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(4, vocab, size=(2, 6))
    mask = np.ones_like(prompt)
    mask[1, :PAD] = 0
    graph = OrtGraph(bundle, initializers=initializers)
    graph.reset(batch=2)
    logits = graph.step(prompt, mask)
    np.testing.assert_allclose(logits[0], _reference_logits(reference, prompt[:1])[0], atol=ATOL)
    row1 = prompt[1:, PAD:]
    np.testing.assert_allclose(
        logits[1, PAD:], _reference_logits(reference, row1)[0], atol=ATOL, err_msg="padded row"
    )

    decode = rng.integers(4, vocab, size=(2, 8))
    full0 = _reference_logits(reference, np.concatenate([prompt[:1], decode[:1]], axis=1))[0]
    full1 = _reference_logits(reference, np.concatenate([row1, decode[1:]], axis=1))[0]
    for step in range(decode.shape[1]):
        logits = graph.step(decode[:, step : step + 1])
        np.testing.assert_allclose(logits[0, 0], full0[6 + step], atol=ATOL, err_msg=f"step {step}")
        np.testing.assert_allclose(logits[1, 0], full1[6 - PAD + step], atol=ATOL)

    expected = _greedy_reference(reference, prompt[:1], 16)
    np.testing.assert_array_equal(graph.greedy(prompt[:1], 16), expected)


@pytest.mark.parametrize(("arch", "method"), list(_cases()))
def test_merged_export_matches_peft(tmp_path, arch, method):
    base = tiny_model(arch)
    adapter = make_adapter(base, method, tmp_path)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    with torch.no_grad():
        ids = torch.arange(4, 12)[None]
        assert (reference(ids).logits - base(ids).logits).abs().max() > 1e-2, "adapter is a no-op"

    tokenizer = save_tiny_tokenizer(tmp_path / "tokenizer")
    manifest = export_bundle(
        InMemoryBase(base, tokenizer, arch), [("a", adapter)], out=tmp_path / "bundle"
    )

    assert manifest.adapters.merged == {"name": "a", "method": method, "source": str(adapter)}
    check_parity(tmp_path / "bundle", reference, base.config.vocab_size)


VARIANTS = {
    "llama-lora-rank-alpha-pattern": (
        "llama",
        "lora",
        {"rank_pattern": {"q_proj": 2, "down_proj": 8}, "alpha_pattern": {"v_proj": 3}},
    ),
    "llama-lora-bias": ("llama", "lora", {"lora_bias": True}),
    "qwen2-lora-modules-to-save": ("qwen2", "lora", {"modules_to_save": ["lm_head"]}),
    "gpt2-lora-tied-modules-to-save": ("gpt2", "lora", {"modules_to_save": ["lm_head"]}),
    "gpt2-dora-rank-pattern": ("gpt2", "dora", {"rank_pattern": {"c_fc": 8}}),
    "qwen2-lokr-decompose-both": ("qwen2", "lokr", {"decompose_both": True, "decompose_factor": 4}),
    "llama-loha-patterns": (
        "llama",
        "loha",
        {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 1}},
    ),
    "llama-ia3-two-feedforward": (
        "llama",
        "ia3",
        {"feedforward_modules": ["down_proj", "up_proj"]},
    ),
}


@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_merged_variants_match_peft(tmp_path, case):
    arch, method, overrides = VARIANTS[case]
    base = tiny_model(arch)
    adapter = make_adapter(base, method, tmp_path, **overrides)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    export_bundle(InMemoryBase(base), [("v", adapter)], out=tmp_path / "bundle")
    check_parity(tmp_path / "bundle", reference, base.config.vocab_size)
