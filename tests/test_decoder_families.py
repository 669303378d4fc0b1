"""Decoder families beyond llama / qwen2 / gpt2, against PEFT on tiny seeded models (fp32).

Per family two exports: merged (a DoRA folded in; MoE: a LoRA on attention and on the fused
experts) checked on prefill with a left-padded row, decode through the KV cache and greedy
tokens; and runtime (LoRA, DoRA, IA3, prefix and prompt tuning in one bundle) run through the
Python runtime as one mixed, left-padded batch, every row checked against PEFT's forward on
prefill and 16 decode steps. The runtime graph is then built with TensorRT-RTX (ahead of
time), when it is installed. MoE extras: runtime mode refuses LoRA on the fused experts, and
an int4 Qwen2-MoE (2-D inputs to its shared expert) equals PEFT on the graph's weights.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from prompt_helpers import check_row, peft_model, run_rows
from test_merged_parity import check_parity
from tiny import make_adapter, make_adapters, save_tiny_tokenizer, tiny_model

from peft_export.exporter.errors import ExportError
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.models.architectures import get_arch
from peft_export.runtime.session import load_bundle

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
"""Llama 3.1's scaling with a short original context, so tiny positions hit every band."""

FAMILIES: dict[str, tuple[str, dict]] = {
    "qwen3": ("qwen3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "smollm3": ("smollm3", {}),
    "stablelm": ("stablelm", {}),
    "phi": ("phi", {}),
    "gpt_neox": ("gpt_neox", {}),
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
}
RUNTIME_ADAPTERS = {
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "ia3": ("ia3", {}),
    "prefix": ("prefix_tuning", {}),
    "prompt": ("prompt_tuning", {"num_virtual_tokens": 3}),
}
PROMPTS = {
    "lora": [5, 17, 33, 80, 120, 9, 44],
    "dora": [7, 19, 200, 31],
    "ia3": [11, 12, 13, 140, 150, 16],
    "prefix": [21, 90, 4, 250, 60],
    "prompt": [101, 102, 3, 77, 8, 9, 10, 240],
    None: [66, 67, 68],
}
"""One row per adapter (and one without), different lengths, so the batch is left-padded."""


@dataclass
class Family:
    arch: str
    base: torch.nn.Module
    tmp: Path

    @property
    def experts(self) -> tuple[str, ...]:
        return get_arch(self.arch).expert_parameters


def _family(name: str, tmp_path_factory) -> Family:
    arch, overrides = FAMILIES[name]
    return Family(arch, tiny_model(arch, **overrides), tmp_path_factory.mktemp(name))


_RUNTIME: dict[str, tuple[Family, Path, dict[str, Path]]] = {}


def _runtime_bundle(name: str, tmp_path_factory) -> tuple[Family, Path, dict[str, Path]]:
    """One runtime export per family per test process (the mixed batch and the TRT build)."""
    if name not in _RUNTIME:
        family = _family(name, tmp_path_factory)
        dirs = make_adapters(family.base, RUNTIME_ADAPTERS, family.tmp / "adapters", first_seed=5)
        out = family.tmp / "runtime"
        export_bundle(
            InMemoryBase(family.base, save_tiny_tokenizer(family.tmp / "tokenizer")),
            list(dirs.items()),
            out=out,
            mode="runtime",
            planners=[plan_lora_banks, plan_prompt_inputs],
        )
        _RUNTIME[name] = (family, out, dirs)
    return _RUNTIME[name]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_merged_matches_peft(tmp_path_factory, name: str) -> None:
    family = _family(name, tmp_path_factory)
    if family.experts:
        method, overrides = "lora", {"target_parameters": list(family.experts)}
    else:
        method, overrides = "dora", {}
    adapter_dir = make_adapter(family.base, method, family.tmp, name="m", seed=3, **overrides)
    reference = PeftModel.from_pretrained(copy.deepcopy(family.base), adapter_dir).eval()
    with torch.no_grad():
        ids = torch.arange(4, 12)[None]
        gap = (reference(ids).logits - family.base(ids).logits).abs().max()
    assert gap > 1e-3, "adapter is a no-op"
    out = family.tmp / "merged"
    export_bundle(InMemoryBase(family.base), [("m", adapter_dir)], out=out)
    check_parity(out, reference, family.base.config.vocab_size)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_runtime_mixed_batch_matches_peft(tmp_path_factory, name: str) -> None:
    family, out, dirs = _runtime_bundle(name, tmp_path_factory)
    bundle = load_bundle(out)
    rows = list(PROMPTS)
    runs = run_rows(bundle, [PROMPTS[r] for r in rows], rows)
    for row, run in zip(rows, runs, strict=True):
        model = family.base if row is None else peft_model(family.base, dirs[row])
        check_row(run, model, PROMPTS[row])


HAS_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt_rtx", "tensorrt"))


@pytest.mark.skipif(not HAS_TRT, reason="neither TensorRT nor TensorRT-RTX is installed")
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_runtime_graph_builds_with_tensorrt(tmp_path_factory, monkeypatch, name: str) -> None:
    from peft_export.bundle.manifest import load_manifest
    from peft_export.exporter.engines.build import EngineOptions, build_engines

    monkeypatch.setenv("PEFT_EXPORT_CACHE", str(tmp_path_factory.mktemp("trt-cache")))
    _, out, _ = _runtime_bundle(name, tmp_path_factory)
    options = EngineOptions(batch="1:2:4", seq="1:8:32", past="0:16:64", progress=False)
    record = build_engines(out, load_manifest(out), options)
    assert (out / record.file).stat().st_size > 10_000


def test_runtime_refuses_lora_on_fused_experts(tmp_path_factory) -> None:
    family = _family("mixtral", tmp_path_factory)
    overrides = {"target_parameters": list(family.experts)}
    dirs = make_adapters(family.base, {"e": ("lora", overrides)}, family.tmp, first_seed=3)
    with pytest.raises(ExportError, match=r"experts\.gate_up_proj.*--mode merged"):
        export_bundle(
            InMemoryBase(family.base),
            list(dirs.items()),
            out=family.tmp / "bundle",
            mode="runtime",
            planners=[plan_lora_banks],
        )


def test_int4_moe_merged_matches_peft_on_the_graph_weights(tmp_path_factory) -> None:
    """Qwen2-MoE's shared expert sees [tokens, hidden] (2-D), so its linears trace to Gemm
    with transB: quantized, they must still equal PEFT's merged model on the graph's weights
    (read back by ONNX Runtime, float32 compute); the fused experts stay float."""
    import onnx
    from test_quantized_parity import ort_weights, with_weights

    from peft_export.bundle.manifest import load_manifest
    from peft_export.exporter.quantize.scheme import ACCURACY_EXACT, QuantScheme

    family = _family("qwen2_moe", tmp_path_factory)
    adapter = make_adapter(
        family.base, "lora", family.tmp, seed=3, target_parameters=list(family.experts)
    )
    out = family.tmp / "int4"
    scheme = QuantScheme.parse("int4", ort_only=False)
    tokenizer = save_tiny_tokenizer(family.tmp / "tokenizer")
    export_bundle(InMemoryBase(family.base, tokenizer), [("m", adapter)], out=out, quantize=scheme)
    assert "model.layers.0.mlp.shared_expert.gate_proj" in load_manifest(out).quantization.modules
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type == "Gemm" and n.input[1].endswith(".dequantized") for n in graph.node)
    merged = PeftModel.from_pretrained(copy.deepcopy(family.base), adapter).merge_and_unload()
    reference = with_weights(merged.eval(), ort_weights(out))
    bundle = load_bundle(out, quant_accuracy=ACCURACY_EXACT)
    prompts = [PROMPTS["lora"], PROMPTS[None]]
    for prompt, run in zip(prompts, run_rows(bundle, prompts, [None, None], 8), strict=True):
        check_row(run, reference, prompt)
