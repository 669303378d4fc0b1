"""Refit mapping: merged weights -> the ONNX initializers a refittable engine refits.

Without a GPU no Refitter can run, so the refit sets are applied to the ONNX initializers
by name instead and the graph is run in ONNX Runtime: that checks names, layouts (Linear vs
GPT-2 Conv1D transposes), shapes and dtypes against PyTorch/PEFT's own merged model.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_run import run_cli
from onnx import numpy_helper
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

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
    second_set = load_file(str(bundle / names.refit_file("second")))
    base_set = load_file(str(bundle / names.refit_file("base")))
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


def _apply_sets(graph_path, bundle, *set_names: str) -> onnx.ModelProto:
    graph = onnx.load(str(graph_path))
    initializers = {t.name: t for t in graph.graph.initializer}
    for set_name in set_names:
        for name, value in load_file(str(bundle / names.refit_file(set_name))).items():
            initializers[name].CopyFrom(numpy_helper.from_array(value, name))
    return graph


@pytest.fixture(scope="module")
def merged_bundle(tmp_path_factory):
    """A merged bundle exported by the CLI from an HF folder, with its adapters."""
    from tiny import make_adapter, save_tiny_base

    root = tmp_path_factory.mktemp("refit-cli")
    base_dir = save_tiny_base("llama", root / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    adapters = {
        "first": make_adapter(base, "lora", root, name="first", seed=1),
        "second": make_adapter(base, "dora", root, name="second", seed=2, r=2),
        "prefix": make_adapter(base, "prefix_tuning", root, name="prefix"),
    }
    bundle = root / "bundle"
    args = ["export", "--base", str(base_dir), "--adapter", f"first={adapters['first']}"]
    assert run_cli(*args, "--out", str(bundle)) == 0
    return base_dir, base, adapters, bundle


def test_adapters_add_on_merged_bundle_writes_refit_sets(merged_bundle, tmp_path, capsys) -> None:
    """`adapters add` on a merged bundle: refit sets that, applied to the graph's initializers,
    give PEFT's merged model of the new adapter, and of the export-time adapter back."""
    _, base, adapters, original = merged_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    assert run_cli("adapters", "add", str(bundle), f"second={adapters['second']}") == 0
    assert "refit set" in capsys.readouterr().out
    manifest = load_manifest(bundle)
    assert set(manifest.adapters.installed) == {"first", "second"}
    assert manifest.adapters.installed["second"].method == "dora"

    ids = np.random.default_rng(0).integers(4, 200, (2, 6)).astype(np.int64)

    def run_sets(*set_names: str) -> np.ndarray:
        graph = _apply_sets(bundle / names.GRAPH, bundle, *set_names)
        path = tmp_path / f"refitted-{'-'.join(set_names)}.onnx"
        onnx.save(graph, str(path))
        return logits(ort.InferenceSession(str(path)), manifest, ids)

    with torch.no_grad():
        want = {
            name: merged(base, adapters[name])(input_ids=torch.from_numpy(ids)).logits.numpy()
            for name in ("first", "second")
        }
    assert np.abs(want["first"] - want["second"]).max() > 1e-3
    assert np.abs(run_sets("base", "second") - want["second"]).max() < 1e-4
    assert np.abs(run_sets("base", "first") - want["first"]).max() < 1e-4

    assert run_cli("adapters", "list", str(bundle)) == 0
    assert "second" in capsys.readouterr().out
    assert run_cli("adapters", "remove", str(bundle), "second") == 0
    assert "second" not in load_manifest(bundle).adapters.installed
    assert not (bundle / names.refit_file("second")).exists()


def test_adapters_add_on_merged_bundle_refusals(merged_bundle, tmp_path, capsys) -> None:
    from tiny import save_tiny_base

    _, _, adapters, original = merged_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    other_base = save_tiny_base("llama", tmp_path / "other-base", seed=7)
    cases = [
        (["adapters", "add", str(bundle), f"p={adapters['prefix']}"], "cannot be merged"),
        (
            ["adapters", "add", str(bundle), f"x={adapters['second']}", "--base", str(other_base)],
            "weights hash differs",
        ),
        (["adapters", "add", str(bundle), f"x={adapters['second']}", "--onnx-adapter"], "runtime"),
        (["adapters", "remove", str(bundle), "nope"], "no adapter 'nope'"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert run_cli(*argv) == 2, argv
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], err
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before


def test_ort_refuses_refit_sets_with_a_clear_error(merged_bundle, tmp_path) -> None:
    from peft_export.runtime import load_bundle
    from peft_export.runtime.errors import InferenceError

    _, _, adapters, original = merged_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    assert run_cli("adapters", "add", str(bundle), f"second={adapters['second']}") == 0
    loaded = load_bundle(bundle)
    with pytest.raises(InferenceError, match="refit sets for a TensorRT engine"):
        loaded.generate([[5, 6, 7]], adapters="second", max_new_tokens=2)
    assert len(loaded.generate([[5, 6, 7]], max_new_tokens=2).token_ids[0]) == 2
