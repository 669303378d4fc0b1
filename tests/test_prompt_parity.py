"""Prompt-side adapters as runtime inputs, against PEFT's forward (fp32, tiny models).

One runtime bundle per architecture carries every prompt-side variant PEFT supports there
(llama also a LoRA adapter), exported once per module; each adapter then runs through the
Python runtime and must match PEFT on prefill and decode logits and 16 greedy tokens.
"""

from __future__ import annotations

import pytest
from prompt_helpers import check_row, peft_model, reference_logits, run_rows
from tiny import make_adapter, save_tiny_tokenizer, tiny_model

from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.session import load_bundle

PROMPT = [5, 17, 33, 80, 120, 9, 44]
VARIANTS = {
    "prefix": ("prefix_tuning", {}),
    "prefix_proj": ("prefix_tuning", {"prefix_projection": True, "num_virtual_tokens": 6}),
    "prompt_random": ("prompt_tuning", {}),
    "prompt_text": ("prompt_tuning", {"prompt_tuning_init": "TEXT", "num_virtual_tokens": 5}),
    "ptune_mlp": ("p_tuning", {}),
    "ptune_lstm": ("p_tuning", {"encoder_reparameterization_type": "LSTM"}),
}
ADAPTION = {
    "adaption": ("adaption_prompt", {}),
    "adaption_top1": ("adaption_prompt", {"adapter_layers": 1, "adapter_len": 3}),
}
"""PEFT has AdaptionPrompt for Llama-family models and GPT-2, not Qwen2."""
EXTRA = {"llama": {**ADAPTION, "lora": ("lora", {})}, "gpt2": ADAPTION, "qwen2": {}}


class ArchBundle:
    def __init__(self, arch: str, tmp) -> None:
        self.base = tiny_model(arch)
        variants = {**VARIANTS, **EXTRA[arch]}
        self.dirs = {
            name: make_adapter(self.base, method, tmp / "adapters", name=name, **overrides)
            for name, (method, overrides) in variants.items()
        }
        tokenizer = save_tiny_tokenizer(tmp / "tokenizer")
        self.manifest = export_bundle(
            InMemoryBase(self.base, tokenizer),
            list(self.dirs.items()),
            out=tmp / "bundle",
            mode="runtime",
            planners=[plan_lora_banks, plan_prompt_inputs],
            options={"prefix_max_len": 8},
        )
        self.path = tmp / "bundle"
        self.bundle = load_bundle(self.path)
        self._models: dict[str, object] = {}

    def model(self, name: str | None):
        if name is None:
            return self.base
        if name not in self._models:
            self._models[name] = peft_model(self.base, self.dirs[name])
        return self._models[name]


_BUNDLES: dict[str, ArchBundle] = {}


def _arch_bundle(arch: str, tmp_path_factory) -> ArchBundle:
    """One export per architecture per test process, shared by every test here."""
    if arch not in _BUNDLES:
        _BUNDLES[arch] = ArchBundle(arch, tmp_path_factory.mktemp(arch))
    return _BUNDLES[arch]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def arch_bundle(request, tmp_path_factory) -> ArchBundle:
    return _arch_bundle(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> ArchBundle:
    return _arch_bundle("llama", tmp_path_factory)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_peft_forward(arch_bundle: ArchBundle, variant: str) -> None:
    (run,) = run_rows(arch_bundle.bundle, [PROMPT], [variant])
    check_row(run, arch_bundle.model(variant), PROMPT)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", sorted(ADAPTION))
def test_adaption_prompt_matches_peft_forward(tmp_path_factory, arch: str, variant: str) -> None:
    arch_bundle = _arch_bundle(arch, tmp_path_factory)
    (run,) = run_rows(arch_bundle.bundle, [PROMPT], [variant])
    check_row(run, arch_bundle.model(variant), PROMPT)


def test_manifest_records_prompt_inputs(llama: ArchBundle) -> None:
    layout = llama.manifest.adapters
    assert (layout.prefix_max_len, layout.prompt_max_len, layout.adaption_max_len) == (8, 5, 4)
    assert {"prefix_tuning", "prompt_tuning", "p_tuning", "adaption_prompt", "lora"} <= set(
        layout.methods
    )
    assert layout.installed["prefix_proj"].method == "prefix_tuning"
    assert (llama.path / "adapters" / "_adaption_base.safetensors").is_file()


def test_mixed_batch_equals_each_row_alone(llama: ArchBundle) -> None:
    rows = [
        ("prefix", PROMPT),
        ("prefix_proj", PROMPT[:4]),
        ("prompt_text", PROMPT[2:]),
        ("ptune_lstm", PROMPT[:5]),
        ("lora", PROMPT[1:]),
        (None, PROMPT[:3]),
        ("adaption", PROMPT[3:]),
        ("adaption_top1", PROMPT),
    ]
    mixed = run_rows(llama.bundle, [ids for _, ids in rows], [name for name, _ in rows])
    for (name, ids), together in zip(rows, mixed, strict=True):
        (alone,) = run_rows(llama.bundle, [ids], [name])
        assert together.tokens == alone.tokens, name
        err = float(abs(together.logits - alone.logits).max())
        assert err <= 1e-4, f"{name}: {err:.3g}"
    check_row(mixed[4], llama.model("lora"), PROMPT[1:])
    check_row(mixed[5], llama.model(None), PROMPT[:3])


def test_fp16_bundle_tracks_peft_fp32(tmp_path) -> None:
    """fp16 graph inputs (prefix past, prompt_embeds, AdaptionPrompt) cast and place right."""
    base = tiny_model("llama")
    methods = {"pre": "prefix_tuning", "pt": "p_tuning", "ad": "adaption_prompt"}
    dirs = {name: make_adapter(base, m, tmp_path, name=name) for name, m in methods.items()}
    export_bundle(
        InMemoryBase(base),
        list(dirs.items()),
        out=tmp_path / "bundle",
        mode="runtime",
        precision="fp16",
        planners=[plan_prompt_inputs],
    )
    bundle = load_bundle(tmp_path / "bundle")
    runs = run_rows(bundle, [PROMPT] * 3, list(dirs), n=8)
    for name, run in zip(dirs, runs, strict=True):
        reference = reference_logits(peft_model(base, dirs[name]), PROMPT + run.tokens[:-1])
        err = float(abs(run.logits - reference).max())
        assert err <= 5e-3, f"{name}: {err:.3g}"


def test_chunked_prefill_matches_peft(llama: ArchBundle) -> None:
    """Prompt embeddings and prefix past enter with the first chunk only."""
    chunked = load_bundle(llama.path, prefill_chunk=3)
    names = ["prefix_proj", "prompt_text", "adaption", None]
    runs = run_rows(chunked, [PROMPT] * len(names), names, n=4)
    for name, run in zip(names, runs, strict=True):
        check_row(run, llama.model(name), PROMPT)
