"""Merged mode for every registry method beyond the LoRA family and IA3 (bundle/methods.py).

Each method's merged model equals PEFT's unmerged forward on tiny Llama when its weights run
in an exported graph (ONNX Runtime): two rows (one left-padded) prefilled, then 12 greedy
steps through the KV cache; every position's logits within 1e-4 of PEFT's and the greedy ids
identical (tests/method_checks.py). The reference is PEFT's own forward, computed here.

Export is the slow step (tens of seconds) and the graph of a merged adapter is the base's
graph with other weights, so one bundle is exported end to end (VeRA) and every other method
that only changes existing weights runs in that graph with its merged weights in place of
the graph's (`exporter.merge.merge_adapter`, the export's own merge step, then ONNX Runtime's
initializer override). Methods that change the graph's structure are exported end to end:
BEFT adds biases Llama lacks; LN tuning gives each norm its own weight (the base's norms are
all ones, one shared initializer).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from method_checks import check_graph
from ort_graph import OrtGraph
from peft import PeftModel
from tiny import MERGEABLE_METHODS, make_adapter, tiny_model
from torch import nn

from peft_export.bundle import methods
from peft_export.exporter.adapter_source import read_adapter
from peft_export.exporter.engines.refit import refit_targets, refit_tensors
from peft_export.exporter.merge import merge_adapter
from peft_export.exporter.pipeline import InMemoryBase, export_bundle

MERGED = [m for m in methods.merged_names() if m not in MERGEABLE_METHODS]
"""The LoRA family and IA3 run in test_merged_parity on three architectures."""
EXPORTED = ("beft", "ln_tuning")
SHARED_GRAPH = "vera"
SWAPPED = [m for m in MERGED if m not in (*EXPORTED, SHARED_GRAPH)]
STEPS = 12
WRAPPER_PREFIX = "model."
"""The exported graph names a parameter of the HF model `model.NAME` (DecoderWrapper)."""


def _reference(base: nn.Module, adapter) -> nn.Module:
    reference = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    with torch.no_grad():
        ids = torch.arange(4, 12)[None]
        assert (reference(ids).logits - base(ids).logits).abs().max() > 1e-3, "adapter is a no-op"
    return reference


@pytest.fixture(scope="module")
def shared_graph(tmp_path_factory):
    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("merged-methods")
    adapter = make_adapter(base, SHARED_GRAPH, tmp)
    manifest = export_bundle(InMemoryBase(base), [("a", adapter)], out=tmp / "bundle")
    assert manifest.adapters.merged["method"] == SHARED_GRAPH
    return base, adapter, tmp / "bundle"


def test_shared_graph_export_matches_peft(shared_graph):
    base, adapter, bundle = shared_graph
    _check(bundle, _reference(base, adapter))


@pytest.mark.parametrize("method", EXPORTED)
def test_merged_export_matches_peft(tmp_path, method):
    base = tiny_model("llama")
    adapter = make_adapter(base, method, tmp_path)
    reference = _reference(base, adapter)
    manifest = export_bundle(InMemoryBase(base), [("a", adapter)], out=tmp_path / "bundle")
    assert manifest.adapters.merged["method"] == method
    _check(tmp_path / "bundle", reference)


@pytest.mark.parametrize("method", SWAPPED)
def test_merged_weights_match_peft(shared_graph, tmp_path, method):
    base, _, bundle = shared_graph
    adapter = make_adapter(base, method, tmp_path)
    reference = _reference(base, adapter)
    source = read_adapter(adapter, name="a", base=base)
    assert source.method == method
    merged = merge_adapter(copy.deepcopy(base), source)
    weights = _graph_weights(bundle, merged, base)
    _check(bundle, reference, weights)


def _check(bundle, reference: nn.Module, weights: dict[str, np.ndarray] | None = None) -> None:
    prompts = np.random.default_rng(0).integers(4, 250, size=(2, 6))
    graph = OrtGraph(bundle, initializers=weights)
    check_graph(graph, [reference, reference], prompts, STEPS, names=["0", "1 (padded)"], pad=2)


def _graph_weights(bundle, merged: nn.Module, base: nn.Module) -> dict[str, np.ndarray]:
    """Every weight of `merged` under the graph initializer that holds it; a changed weight
    the graph has no initializer of its own for fails the test (its structure differs)."""
    graph_file = bundle / "model.onnx"
    linear = {
        f"{path}.weight": module.weight.detach().numpy()
        for path, module in merged.named_modules()
        if isinstance(module, nn.Linear)
    }
    out = refit_tensors(refit_targets(graph_file), linear)
    initializers = {t.name for t in onnx.load(str(graph_file)).graph.initializer}
    base_params = dict(base.named_parameters())
    for name, param in merged.named_parameters():
        if name in linear:
            continue
        if WRAPPER_PREFIX + name in initializers:
            out[WRAPPER_PREFIX + name] = param.detach().numpy()
        else:
            assert torch.equal(param, base_params[name]), f"{name} changed: no initializer"
    return out
