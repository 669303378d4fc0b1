"""Refit mapping: merged weights -> the ONNX initializers a refittable engine refits.

Without a GPU no Refitter can run, so the refit sets are applied to the ONNX initializers
by name instead and the graph is run in ONNX Runtime: that checks names, layouts (Linear vs
GPT-2 Conv1D transposes), shapes and dtypes against PyTorch/PEFT's own merged model.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import load_file

from peft_export.bundle import names
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.engines import refit
from peft_export.exporter.errors import ExportError


def weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def merged(base: torch.nn.Module, adapter) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload().eval()


def logits(session: ort.InferenceSession, manifest, ids: np.ndarray) -> np.ndarray:
    batch, seq = ids.shape
    feeds = {
        names.INPUT_IDS: ids,
        names.ATTENTION_MASK: np.ones((batch, seq), np.int64),
        names.POSITION_IDS: np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
    }
    empty = np.zeros((batch, manifest.kv.num_kv_heads, 0, manifest.kv.head_dim), np.float32)
    for layer in range(manifest.kv.num_layers):
        feeds[names.past_key(layer)] = feeds[names.past_value(layer)] = empty
    return session.run([names.LOGITS], feeds)[0]


@pytest.mark.parametrize(("arch", "method"), [("llama", "lora"), ("gpt2", "lora")])
def test_refit_sets_reproduce_another_merged_adapter(tmp_path, arch, method) -> None:
    from tiny import make_adapter, tiny_model

    from peft_export.exporter.pipeline import export_model

    base = tiny_model(arch)
    first = make_adapter(base, method, tmp_path, name="first", seed=1)
    second = make_adapter(base, method, tmp_path, name="second", seed=2, r=2)
    bundle = tmp_path / "bundle"
    export_model(merged(base, first), bundle)
    manifest = load_manifest(bundle)
    graph_path = bundle / names.GRAPH

    targets = refit.refit_targets(graph_path)
    graph = onnx.load(str(graph_path))
    initializers = {t.name: t for t in graph.graph.initializer}
    for target in targets.values():
        assert tuple(initializers[target.initializer].dims) == target.shape

    base_w = weights(base)
    second_model = merged(base, second)
    stored = refit.write_refit_set(bundle, "second", base_w, weights(second_model))
    assert stored and set(stored) <= set(refit.refittable_initializers(targets))
    second_set = load_file(str(bundle / refit.REFIT_DIR / "second.safetensors"))
    base_set = load_file(str(bundle / refit.REFIT_DIR / "base.safetensors"))
    assert set(second_set) <= set(base_set)

    for name, value in {**base_set, **second_set}.items():
        assert value.shape == tuple(initializers[name].dims)
        initializers[name].CopyFrom(numpy_helper.from_array(value, name))
    refitted = tmp_path / "refitted.onnx"
    onnx.save(graph, str(refitted))
    ids = np.random.default_rng(0).integers(4, 200, (2, 6)).astype(np.int64)
    got = logits(
        ort.InferenceSession(str(refitted), providers=["CPUExecutionProvider"]), manifest, ids
    )
    with torch.no_grad():
        want = second_model(input_ids=torch.from_numpy(ids)).logits.numpy()
        first_logits = merged(base, first)(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(first_logits - want).max() > 1e-3, "the adapters must differ for the test"


def test_unknown_or_reshaped_weights_are_refused(tmp_path) -> None:
    from tiny import tiny_model

    from peft_export.exporter.pipeline import export_model

    base = tiny_model("llama")
    export_model(base, tmp_path / "b")
    targets = refit.refit_targets(tmp_path / "b" / names.GRAPH)
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ExportError, match="not a projection"):
        refit.refit_tensors(targets, {"model.norm.weight": np.ones(64, np.float32)})
    with pytest.raises(ExportError, match="shape"):
        refit.refit_tensors(targets, {q: np.ones((3, 3), np.float32)})
    out = refit.refit_tensors(targets, {q: np.arange(64 * 64, dtype=np.float64).reshape(64, 64)})
    (value,) = out.values()
    assert value.dtype == np.float32 and value[0, 1] == 64.0  # stored transposed, [in, out]
