"""Gemma, Gemma 2, Gemma 3 (text), Phi-3 and Phi-3 with LongRoPE against PyTorch/PEFT (fp32).

Per family, one runtime export serves LoRA, DoRA, IA3, prefix and prompt tuning (Phi-3's LoRA
targets its fused qkv_proj / gate_up_proj), and one merged export folds one method in (the fold
is PEFT's own merge_and_unload, the same for every family; the runtime export covers every
method per family). Rows mix prompts longer than the sliding window with short ones, so in one
left-padded batch a prefix or prompt sits before a long run of padding, and every generation
crosses the window. The reference is PEFT's forward over the whole sequence for each row alone.

LongRoPE rows are either long from their first step (prompt past the original context) or stay
short to the end: a row that crosses mid-generation keeps its earlier keys at short factors, as
HF's own cached generate does, which a no-cache reference cannot reproduce.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from prompt_helpers import check_row, peft_model, run_rows
from tiny import make_adapter, save_tiny_tokenizer, tiny_model

from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.models.architectures import get_arch, tiny_longrope
from peft_export.runtime.session import load_bundle

FAMILIES = {
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", {}),
    "phi3": ("phi3", {}),
    "phi3_longrope": ("phi3", tiny_longrope(original=16)),
}
ADAPTERS = {
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "ia3": ("ia3", {}),
    "prefix": ("prefix_tuning", {}),
    "prompt": ("prompt_tuning", {"num_virtual_tokens": 5}),
}
MERGED = {"gemma": "dora", "gemma2": "ia3", "gemma3_text": "lora", "phi3": "lora"}
"""The method each family's merged export folds in (one merged export per family; LongRoPE is
the same phi3 graph with another rotary piece, which the runtime export covers)."""
SDPA = {"gemma", "gemma3_text", "phi3"}
"""Merged exports trace these with SDPA attention, what `export --base` loads by default (the
runtime exports trace eager); Gemma 2 has eager only (soft-capping)."""
NEW_TOKENS = 8
LONG, SHORT = 18, 3
"""Long prompts pass every window (5-6) and LongRoPE's original 16 positions at prefill; short
rows (with up to 5 virtual tokens and 8 new ones) stay within 16 positions, yet cross the
window while generating."""
ROWS = [
    ("lora", LONG),
    ("dora", SHORT),
    ("ia3", LONG),
    ("prefix", SHORT),
    ("prefix", LONG),
    ("prompt", SHORT),
    ("prompt", LONG),
    (None, SHORT),
    ("lora", SHORT),
]


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 250, size=n).tolist() for n in lengths]


class Family:
    """One family's tiny base, adapters and runtime bundle, built once per test process."""

    def __init__(self, family: str, tmp: Path) -> None:
        arch, overrides = FAMILIES[family]
        self.family = family
        self.base = tiny_model(arch, **overrides)
        self.dirs = {
            name: make_adapter(self.base, method, tmp / "adapters", name=name, **extra)
            for name, (method, extra) in ADAPTERS.items()
        }
        self.tokenizer = save_tiny_tokenizer(tmp / "tokenizer")
        self.path = tmp / "runtime"
        export_bundle(
            InMemoryBase(self.base, self.tokenizer),
            list(self.dirs.items()),
            out=self.path,
            mode="runtime",
            planners=[plan_lora_banks, plan_prompt_inputs],
            options={"prefix_max_len": 4},
        )
        self.bundle = load_bundle(self.path)
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, name: str | None) -> torch.nn.Module:
        if name is None:
            return self.base
        if name not in self._models:
            self._models[name] = peft_model(self.base, self.dirs[name])
        return self._models[name]


_FAMILIES: dict[str, Family] = {}


def _family(name: str, tmp_path_factory) -> Family:
    if name not in _FAMILIES:
        _FAMILIES[name] = Family(name, tmp_path_factory.mktemp(name))
    return _FAMILIES[name]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    return _family(request.param, tmp_path_factory)


def test_runtime_mixed_batch_matches_peft_rows_alone(family: Family) -> None:
    """Every method, long and short rows in one batch: tokens equal and logits <= 1e-4."""
    prompts = _prompts([n for _, n in ROWS], seed=1)
    adapters = [name for name, _ in ROWS]
    runs = run_rows(family.bundle, prompts, adapters, n=NEW_TOKENS)
    for (name, _), ids, run in zip(ROWS, prompts, runs, strict=True):
        check_row(run, family.model(name), ids)


def test_chunked_prefill_across_the_window(family: Family) -> None:
    """A prefill in chunks shorter than the prompt masks the window across chunk borders.

    LongRoPE's first chunk already passes the original context: a shorter first chunk would
    rotate its keys with the short factors (a crossing row, as in HF's cached generate)."""
    chunk = 17 if family.family == "phi3_longrope" else 4
    chunked = load_bundle(family.path, prefill_chunk=chunk)
    rows = [("prefix", LONG), ("prompt", LONG), (None, SHORT)]
    prompts = _prompts([n for _, n in rows], seed=2)
    runs = run_rows(chunked, prompts, [name for name, _ in rows], n=4)
    for (name, _), ids, run in zip(rows, prompts, runs, strict=True):
        check_row(run, family.model(name), ids)


@pytest.mark.parametrize("name", sorted(MERGED))
def test_merged_export_matches_peft(name: str, tmp_path_factory, tmp_path) -> None:
    family = _family(name, tmp_path_factory)
    method = MERGED[name]
    out = tmp_path / "merged"
    model = copy.deepcopy(family.base)
    if name in SDPA:
        model.set_attn_implementation("sdpa")
    export_bundle(InMemoryBase(model, family.tokenizer), [("a", family.dirs[method])], out=out)
    bundle = load_bundle(out)
    prompts = _prompts([LONG, SHORT, LONG + 2, SHORT + 1], seed=3)
    runs = run_rows(bundle, prompts, [None] * len(prompts), n=NEW_TOKENS)
    for ids, run in zip(prompts, runs, strict=True):
        check_row(run, family.model(method), ids)


@torch.no_grad()
def _cached_greedy(model: torch.nn.Module, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """HF's cached greedy loop: prefill once, then one token per call through the cache."""
    from transformers import DynamicCache

    out = model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(), use_cache=True)
    logits = [out.logits[0]]
    tokens = [int(logits[-1][-1].argmax())]
    while len(tokens) < n:
        cache = out.past_key_values
        out = model(input_ids=torch.tensor([tokens[-1:]]), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0])
        tokens.append(int(logits[-1][-1].argmax()))
    return tokens, torch.cat(logits).numpy()


def test_longrope_row_crossing_mid_generation_matches_hf_cached_generate(tmp_path_factory) -> None:
    """Rows that pass the original 16 positions while decoding, next to a long row, equal HF's
    cached greedy loop on each row alone (earlier keys stay at the short factors)."""
    family = _family("phi3_longrope", tmp_path_factory)
    rows = [("lora", 10), (None, 12), ("lora", LONG)]
    prompts = _prompts([n for _, n in rows], seed=5)
    runs = run_rows(family.bundle, prompts, [name for name, _ in rows], n=NEW_TOKENS)
    for (name, _), ids, run in zip(rows, prompts, runs, strict=True):
        tokens, logits = _cached_greedy(family.model(name), ids, NEW_TOKENS)
        assert run.tokens == tokens
        assert float(np.abs(run.logits - logits).max()) <= 1e-4


def test_phi3_lora_targets_the_fused_projections(tmp_path_factory) -> None:
    family = _family("phi3", tmp_path_factory)
    modules = {n.rsplit(".", 1)[-1] for n, _ in family.model("lora").named_modules()}
    assert {"qkv_proj", "gate_up_proj"} <= modules
    layout = family.bundle.manifest.adapters
    assert {"qkv_proj", "gate_up_proj"} <= {m.path.rsplit(".", 1)[-1] for m in layout.modules}


def test_sliding_window_is_small_enough_to_matter() -> None:
    """The tiny configs' windows sit below the test prompts, so a wrong mask fails the tests."""
    for arch, overrides in FAMILIES.values():
        config = tiny_model(arch, **overrides).config
        spec = get_arch(arch)
        window = spec.sliding_window(config)
        if arch != "gemma":
            assert window is not None and window < SHORT + NEW_TOKENS
            assert "sliding_attention" in spec.layer_kinds(config)


@pytest.mark.skipif(
    not any(importlib.util.find_spec(m) for m in ("tensorrt_rtx", "tensorrt")),
    reason="neither TensorRT nor TensorRT-RTX is installed",
)
def test_runtime_bundle_builds_with_tensorrt(family: Family, monkeypatch, tmp_path) -> None:
    """The portable runtime graph (banks, prefix past, prompt embeddings) builds ahead of time."""
    from peft_export.bundle.manifest import load_manifest
    from peft_export.exporter.engines.build import EngineOptions, build_engines

    monkeypatch.setenv("PEFT_EXPORT_CACHE", str(tmp_path / "cache"))
    options = EngineOptions(batch="1:2:4", seq="1:8:32", past="0:16:64", progress=False)
    record = build_engines(family.path, load_manifest(family.path), options)
    assert (family.path / record.file).stat().st_size > 10_000


@pytest.mark.parametrize("cap", ["final_logit_softcapping", "attn_logit_softcapping"])
def test_gemma2_soft_caps_bend_the_tiny_model(cap: str) -> None:
    """Each cap changes the tiny Gemma 2's logits >= 10x past the tolerance, so the parity tests
    above would fail if the graph dropped it."""
    ids = torch.tensor([_prompts([LONG], seed=4)[0]])
    with torch.no_grad():
        capped = tiny_model("gemma2")(ids).logits
        uncapped = tiny_model("gemma2", **{cap: None})(ids).logits
    assert float((capped - uncapped).abs().max()) > 1e-3
