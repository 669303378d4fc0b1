"""Runtime-mode LoRA family: every adapter served from one bundle equals its merged PEFT model.

One runtime bundle per architecture (module-scoped), all adapters in its banks; each row is
checked against PyTorch/PEFT computed here (prefill and decode logits, greedy tokens).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from peft import PeftModel

from peft_export.bundle import names
from peft_export.bundle.lora_methods import BANK_ONLY_METHODS, LORA_METHODS
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.adapter_store import AdapterStore
from tests.lora_bundles import lora_bundle
from tests.ort_graph import OrtGraph
from tests.tiny import make_adapter, tiny_model

TOL = 1e-4
METHODS = {
    "llama": ("lora", "rslora", "dora", "ia3", "adalora", "loha", "lokr"),
    "qwen2": ("lora", "rslora", "dora", "ia3", "adalora"),
    "gpt2": ("lora", "rslora", "dora", "ia3", "adalora"),
}
PROMPT = [[1, 17, 42, 99, 5, 230, 64]]
DECODE_STEPS = 3


@pytest.fixture(scope="module", params=sorted(METHODS))
def runtime_bundle(request, tmp_path_factory):
    arch = request.param
    base = tiny_model(arch)
    tmp = tmp_path_factory.mktemp(f"runtime-{arch}")
    dirs = {m: make_adapter(base, m, tmp, seed=3 + i) for i, m in enumerate(METHODS[arch])}
    out = tmp / "bundle"
    export_bundle(
        InMemoryBase(base),
        list(dirs.items()),
        out=out,
        mode="runtime",
        planners=[plan_lora_banks],
    )
    return arch, base, dirs, out


def _merged(base, adapter_dir):
    return PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload().eval()


def _graph_for(bundle, store: AdapterStore, adapters: list[str | None]) -> tuple[OrtGraph, object]:
    lease = store.acquire(adapters)
    feeds = {name: view.numpy() for name, view in store.feeds().items()}
    feeds[names.ADAPTER_IDS] = lease.ids
    return OrtGraph(bundle, feeds), lease


def test_graph_has_one_multilora_node_per_module_and_passes_checker(runtime_bundle):
    """One MultiLoRA node per module and one SlotScale node per out_scale / in_scale input,
    each op with its standard-op function body."""
    _, _, _, bundle = runtime_bundle
    manifest = load_manifest(bundle)
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.domain == names.MULTILORA_DOMAIN]
    multilora = [n for n in nodes if n.op_type == names.MULTILORA_OP]
    assert len(multilora) == len(manifest.adapters.modules)
    scales = [t.name for t in manifest.graph.inputs if t.name.endswith(("out_scale", "in_scale"))]
    assert scales, "the default graph takes DoRA and IA3"
    scaled = sorted(n.input[1] for n in nodes if n.op_type == names.SLOT_SCALE_OP)
    assert scaled == sorted(scales)
    assert len(multilora) + len(scaled) == len(nodes)
    bodies = {f.name: {n.op_type for n in f.node} for f in model.functions}
    assert bodies[names.MULTILORA_OP] == {"Gather", "Transpose", "MatMul"}
    assert bodies[names.SLOT_SCALE_OP] == {"Constant", "Gather", "Unsqueeze", "Mul"}
    assert all(f.domain == names.MULTILORA_DOMAIN for f in model.functions)
    assert any(o.domain == names.MULTILORA_DOMAIN and o.version == 1 for o in model.opset_import)


def _assert_matches_merged_peft(bundle, store: AdapterStore, base, name: str, adapter_dir) -> None:
    """Prefill and decode logits of adapter `name` from the bundle's graph equal PEFT's."""
    ids = torch.tensor(PROMPT)
    reference = _merged(base, adapter_dir)
    graph, lease = _graph_for(bundle, store, [name])
    tokens = ids
    logits = graph.step(ids.numpy())
    for step in range(DECODE_STEPS + 1):
        with torch.no_grad():
            want = reference(tokens).logits[:, -logits.shape[1] :].numpy()
        err = np.abs(logits - want).max()
        assert err <= TOL, f"{name} step {step}: max abs err {err}"
        next_token = want[:, -1].argmax(-1)
        assert logits[:, -1].argmax(-1).tolist() == next_token.tolist()
        tokens = torch.cat([tokens, torch.tensor(next_token)[:, None]], dim=1)
        logits = graph.step(next_token[:, None])
    store.release(lease)
    with torch.no_grad():
        assert np.abs(reference(ids).logits.numpy() - base(ids).logits.numpy()).max() > 1e-2


def test_each_adapter_matches_merged_peft(runtime_bundle):
    arch, base, dirs, bundle = runtime_bundle
    manifest = load_manifest(bundle)
    assert set(manifest.adapters.installed) == set(dirs)
    store = AdapterStore(bundle, manifest)
    for method, adapter_dir in dirs.items():
        _assert_matches_merged_peft(bundle, store, base, method, adapter_dir)


def test_bank_only_methods_join_a_lora_only_bundle(tmp_path):
    """Issue 21 item 4: rsLoRA, AdaLoRA, LoHa and LoKr fill the same A/B banks as LoRA, so a
    bundle exported with `--methods lora` takes them by `adapters add`, and serves them."""
    base = tiny_model("llama")
    methods = ("lora", "rslora", "adalora", "loha", "lokr")
    dirs = {m: make_adapter(base, m, tmp_path, seed=20 + i) for i, m in enumerate(methods)}
    bundle = lora_bundle(base, tmp_path / "b", "lora", dirs, slots=3, max_rank=64, methods="lora")
    manifest = load_manifest(bundle)
    assert manifest.adapters.methods == list(BANK_ONLY_METHODS)
    assert not [t.name for t in manifest.graph.inputs if t.name.endswith("_scale")]
    assert {e.method for e in manifest.adapters.installed.values()} == set(methods)
    store = AdapterStore(bundle, manifest)
    for method, adapter_dir in dirs.items():
        _assert_matches_merged_peft(bundle, store, base, method, adapter_dir)


def test_default_bundle_takes_the_whole_lora_family_by_adapters_add(tmp_path):
    """Issue 21 item 13: a bundle exported with one plain LoRA and no --methods takes rsLoRA,
    DoRA and IA3 later (DoRA's and IA3's scale inputs are there by default)."""
    base = tiny_model("llama")
    methods = ("lora", "rslora", "dora", "ia3")
    dirs = {m: make_adapter(base, m, tmp_path, seed=30 + i) for i, m in enumerate(methods)}
    bundle = lora_bundle(base, tmp_path / "b", "lora", dirs, slots=3, max_rank=4)
    manifest = load_manifest(bundle)
    assert manifest.adapters.methods == list(LORA_METHODS)
    store = AdapterStore(bundle, manifest)
    for method, adapter_dir in dirs.items():
        _assert_matches_merged_peft(bundle, store, base, method, adapter_dir)


def test_slot_zero_is_the_base_model(runtime_bundle):
    _, base, _, bundle = runtime_bundle
    store = AdapterStore(bundle, load_manifest(bundle))
    graph, _ = _graph_for(bundle, store, [None])
    with torch.no_grad():
        want = base(torch.tensor(PROMPT)).logits.numpy()
    assert np.abs(graph.step(np.array(PROMPT)) - want).max() <= TOL


def test_default_in_scale_covers_feed_forward_modules_and_the_adapters_given(tmp_path):
    """By default IA3's input scale exists on the architecture's feed-forward modules (as in
    PEFT's default IA3 config) and where an exported IA3 adapter scales inputs, not on every
    module; an IA3 adapter added later that scales another module's input is refused."""
    from peft_export.exporter.errors import ExportError
    from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter

    base = tiny_model("llama")
    given = make_adapter(base, "ia3", tmp_path, name="up", seed=40, feedforward_modules=["up_proj"])
    lora = make_adapter(base, "lora", tmp_path, seed=41)
    bundle = lora_bundle(base, tmp_path / "b", "up", {"up": given, "lora": lora}, slots=3)
    manifest = load_manifest(bundle)
    scaled = {t.name.split(".")[-2] for t in manifest.graph.inputs if t.name.endswith("in_scale")}
    assert scaled == {"up_proj", "down_proj"}
    store = AdapterStore(bundle, manifest)
    _assert_matches_merged_peft(bundle, store, base, "up", given)
    _assert_matches_merged_peft(bundle, store, base, "lora", lora)
    later = make_adapter(base, "ia3", tmp_path, name="o", seed=42, feedforward_modules=["o_proj"])
    with pytest.raises(ExportError, match=r"o_proj\.in_scale, .*--methods including ia3"):
        add_adapter(bundle, "o", later)
