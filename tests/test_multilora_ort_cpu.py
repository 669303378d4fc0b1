"""The MultiLoRA CPU kernel (libpeft_multilora_ort.so), built here with CMake.

The op is checked against a float64 numpy reference and against its own ONNX function body;
a runtime bundle run with the kernel is checked against PEFT (merged per row, prefill and
decode) and against the function body through the Python runtime.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from peft import PeftModel

from peft_export import plugins
from peft_export.bundle import names
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.runtime_adapters import multilora_op, slot_scale_op
from peft_export.plugins import host_copy
from peft_export.runtime.adapter_store import AdapterStore
from peft_export.runtime.backends.ort import OrtBackend, OrtOptions
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.session import load_bundle
from tests.lora_bundles import lora_bundle
from tests.ort_graph import OrtGraph
from tests.tiny import make_adapters, tiny_model

TOL = 1e-4
ROWS = {"lo": ("lora", {"r": 3}), "r8": ("lora", {"r": 8}), "do": ("dora", {}), "ia": ("ia3", {})}
BATCH = ["lo", "r8", "do", "ia", None, "lo"]


def _op_model(rank: int, in_f: int, out_f: int) -> bytes:
    node = helper.make_node("MultiLoRA", ["x", "A", "B", "ids"], ["y"], domain="peft_export")
    graph = helper.make_graph(
        [node],
        "multilora",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", in_f]),
            helper.make_tensor_value_info("A", TensorProto.FLOAT, ["slots", rank, in_f]),
            helper.make_tensor_value_info("B", TensorProto.FLOAT, ["slots", out_f, rank]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", out_f])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return multilora_op.add_function(model).SerializeToString()


def _session(model: bytes, library: Path | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _reference(x, a, b, ids) -> np.ndarray:
    slots = a.shape[0]
    out = np.zeros((x.shape[0], x.shape[1], b.shape[1]))
    for row, raw in enumerate(ids):
        slot = raw + slots if raw < 0 else raw
        if 0 < slot < slots:
            out[row] = x[row].astype(np.float64) @ a[slot].T.astype(np.float64) @ b[slot].T
    return out


CASES = {
    # name: (batch, seq, in, out, rank, slots, ids)
    "decode, 8 adapters": (8, 1, 64, 96, 16, 9, [1, 2, 3, 4, 5, 6, 7, 8]),
    "decode, shared and base rows": (6, 1, 48, 40, 8, 4, [2, 0, 2, -1, 3, 2]),
    "prefill, rows over one block": (3, 37, 40, 24, 16, 3, [1, 1, 2]),
    "odd sizes, rank tail": (2, 5, 33, 19, 13, 3, [2, 1]),
    "rank below one vector": (3, 2, 20, 11, 3, 2, [1, 0, 1]),
    "outside the banks gives zeros": (3, 1, 16, 16, 4, 3, [7, -9, 1]),
    "one long row of one adapter": (1, 70, 24, 130, 8, 2, [1]),
    "rank 32, outputs past whole groups": (3, 2, 40, 70, 32, 3, [1, 2, 1]),
    "rank 64, prefill": (2, 20, 24, 48, 64, 3, [2, 1]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_float64_reference(cpu_kernel_library, case):
    batch, seq, in_f, out_f, rank, slots, ids = CASES[case]
    rng = np.random.default_rng(len(case))
    x = rng.standard_normal((batch, seq, in_f), dtype=np.float32)
    a = rng.standard_normal((slots, rank, in_f), dtype=np.float32)
    b = rng.standard_normal((slots, out_f, rank), dtype=np.float32)
    a[0], b[0] = 0.0, 0.0
    ids = np.array(ids, dtype=np.int64)
    got = _session(_op_model(rank, in_f, out_f), cpu_kernel_library).run(
        None, {"x": x, "A": a, "B": b, "ids": ids}
    )[0]
    want = _reference(x, a, b, ids)
    scale = np.abs(x).max() * np.abs(a).max() * np.abs(b).max() * in_f * rank
    assert np.abs(got - want).max() <= 1e-6 * scale


def test_kernel_matches_function_body(cpu_kernel_library):
    rng = np.random.default_rng(1)
    feeds = {
        "x": rng.standard_normal((4, 3, 40), dtype=np.float32),
        "A": rng.standard_normal((5, 8, 40), dtype=np.float32),
        "B": rng.standard_normal((5, 24, 8), dtype=np.float32),
        "ids": np.array([4, 0, 1, 4], dtype=np.int64),
    }
    feeds["A"][0], feeds["B"][0] = 0.0, 0.0  # slot 0 is the base model (the contract)
    model = _op_model(8, 40, 24)
    body = _session(model, None).run(None, feeds)[0]
    kernel = _session(model, cpu_kernel_library).run(None, feeds)[0]
    assert np.abs(kernel - body).max() <= 1e-5 * np.abs(body).max()


def test_kernel_refuses_inconsistent_shapes(cpu_kernel_library):
    session = _session(_op_model(4, 16, 8), cpu_kernel_library)
    feeds = {
        "x": np.zeros((2, 1, 16), np.float32),
        "A": np.zeros((3, 4, 16), np.float32),
        "B": np.zeros((3, 8, 4), np.float32),
        "ids": np.zeros(3, np.int64),
    }
    with pytest.raises(Exception, match="MultiLoRA: shapes do not agree"):
        session.run(None, feeds)


def _add_model(rank: int, in_f: int, outs: list[int]) -> bytes:
    """One MultiLoRAAdd{n} node over modules with outputs `outs`, packed in that order."""
    n = len(outs)
    banks = [name for i in range(1, n + 1) for name in (f"A{i}", f"B{i}")]
    op = names.multilora_add_op(n)
    node = helper.make_node(op, ["x", "ids", "base", *banks], ["y"], domain="peft_export")
    packed = ["b", "s", "packed"]  # symbolic: the kernel, not ONNX Runtime, checks the width
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", in_f]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"]),
        helper.make_tensor_value_info("base", TensorProto.FLOAT, packed),
    ]
    for i, out_f in enumerate(outs, start=1):
        inputs += [
            helper.make_tensor_value_info(f"A{i}", TensorProto.FLOAT, ["slots", rank, in_f]),
            helper.make_tensor_value_info(f"B{i}", TensorProto.FLOAT, ["slots", out_f, rank]),
        ]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, packed)
    graph = helper.make_graph([node], "multilora_add", inputs, [output])
    model = multilora_op.add_function(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    )
    model.functions.append(multilora_op.add_function_proto(n, 18))
    return model.SerializeToString()


def _add_feeds(batch, seq, in_f, outs, rank, slots, ids, seed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {
        "x": rng.standard_normal((batch, seq, in_f), dtype=np.float32),
        "ids": np.array(ids, dtype=np.int64),
        "base": rng.standard_normal((batch, seq, sum(outs)), dtype=np.float32),
    }
    for i, out_f in enumerate(outs, start=1):
        feeds[f"A{i}"] = rng.standard_normal((slots, rank, in_f), dtype=np.float32)
        feeds[f"B{i}"] = rng.standard_normal((slots, out_f, rank), dtype=np.float32)
        feeds[f"A{i}"][0], feeds[f"B{i}"][0] = 0.0, 0.0
    return feeds


ADD_CASES = {
    # name: (batch, seq, in, outs, rank, slots, ids)
    "one module, decode": (4, 1, 40, [24], 8, 4, [1, 0, 3, 1]),
    "q/k/v packed, decode": (5, 1, 48, [48, 16, 16], 16, 4, [2, 0, 1, 3, -1]),
    "gate/up packed, prefill": (2, 19, 32, [56, 56], 8, 3, [1, 2]),
    "outside the banks adds nothing": (3, 2, 16, [8, 8, 8], 4, 3, [7, 0, -9]),
}


@pytest.mark.parametrize("case", sorted(ADD_CASES))
def test_add_kernel_matches_reference_and_function_body(cpu_kernel_library, case):
    batch, seq, in_f, outs, rank, slots, ids = ADD_CASES[case]
    feeds = _add_feeds(batch, seq, in_f, outs, rank, slots, ids, seed=len(case))
    model = _add_model(rank, in_f, outs)
    got = _session(model, cpu_kernel_library).run(None, feeds)[0]
    deltas = [
        _reference(feeds["x"], feeds[f"A{i}"], feeds[f"B{i}"], feeds["ids"])
        for i in range(1, len(outs) + 1)
    ]
    want = feeds["base"] + np.concatenate(deltas, axis=-1)
    scale = np.abs(want).max() * rank
    assert np.abs(got - want).max() <= 1e-6 * scale
    if all(0 <= i < slots for i in ids):  # the body's Gather fails outside the banks
        body = _session(model, None).run(None, feeds)[0]
        assert np.abs(got - body).max() <= 1e-5 * scale


def test_add_kernel_refuses_a_base_of_the_wrong_width(cpu_kernel_library):
    feeds = _add_feeds(2, 1, 16, [8, 4], 4, 3, [1, 2], seed=0)
    feeds["base"] = np.zeros((2, 1, 16), np.float32)
    session = _session(_add_model(4, 16, [8, 4]), cpu_kernel_library)
    with pytest.raises(Exception, match=r"MultiLoRAAdd2: base \[2, 1, 16\] is not"):
        session.run(None, feeds)


def _scale_model(n: int) -> bytes:
    node = helper.make_node(names.SLOT_SCALE_OP, ["x", "scale", "ids"], ["y"], domain="peft_export")
    graph = helper.make_graph(
        [node],
        "slot-scale",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", n]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["slots", n]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("peft_export", 1)],
    )
    return slot_scale_op.add_function(model).SerializeToString()


def test_slot_scale_kernel_matches_reference_and_function_body(cpu_kernel_library):
    """Slots: 0 base (ones), 1 scaled, 2 all ones (a plain LoRA's slot), 3 scaled; rows name
    each, a negative id, and (kernel only: the body's Gather would fail) ids outside."""
    rng = np.random.default_rng(3)
    batch, seq, n = 6, 3, 37
    x = rng.standard_normal((batch, seq, n), dtype=np.float32)
    scale = rng.uniform(0.5, 1.5, (4, n)).astype(np.float32)
    scale[0], scale[2] = 1.0, 1.0
    ids = np.array([1, 0, 2, 3, -1, 1], dtype=np.int64)
    model = _scale_model(n)
    want = x * scale[ids][:, None, :]
    kernel = _session(model, cpu_kernel_library)
    got = kernel.run(None, {"x": x, "scale": scale, "ids": ids})[0]
    np.testing.assert_array_equal(got, want)
    body = _session(model, None).run(None, {"x": x, "scale": scale, "ids": ids})[0]
    np.testing.assert_array_equal(got, body)
    outside = np.array([4, -5, 9, 1, 0, 2], dtype=np.int64)
    got = kernel.run(None, {"x": x, "scale": scale, "ids": outside})[0]
    want = x.copy()
    want[3] *= scale[1]
    np.testing.assert_array_equal(got, want)


def test_slot_scale_kernel_refuses_inconsistent_shapes(cpu_kernel_library):
    session = _session(_scale_model(8), cpu_kernel_library)
    feeds = {
        "x": np.zeros((2, 1, 8), np.float32),
        "scale": np.ones((3, 8), np.float32),
        "ids": np.zeros(3, np.int64),
    }
    with pytest.raises(Exception, match=r"SlotScale: expects x \[batch, seq, n\]"):
        session.run(None, feeds)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("ort-cpu-mixed")
    dirs = make_adapters(base, ROWS, tmp, first_seed=20)
    out = lora_bundle(base, tmp / "b", "lo", dirs, slots=6, max_rank=8, methods="lora,dora,ia3")
    return base, dirs, out


def test_bundle_with_kernel_matches_peft_per_row(cpu_kernel_library, mixed):
    base, dirs, bundle = mixed
    store = AdapterStore(bundle, load_manifest(bundle))
    lease = store.acquire(BATCH)
    feeds = {name: view.numpy() for name, view in store.feeds().items()}
    feeds[names.ADAPTER_IDS] = lease.ids
    graph = OrtGraph(bundle, feeds, custom_ops_library=cpu_kernel_library)
    prompts = np.random.default_rng(0).integers(4, 250, size=(len(BATCH), 6))
    graph.reset(batch=len(BATCH))
    steps = [graph.step(prompts)]
    tokens = [prompts]
    for _ in range(2):
        tokens.append(steps[-1][:, -1].argmax(-1)[:, None])
        steps.append(graph.step(tokens[-1]))
    store.release(lease)
    for row, name in enumerate(BATCH):
        model = base
        if name is not None:
            model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[name]).merge_and_unload()
        ids = torch.tensor(np.concatenate([t[row : row + 1] for t in tokens], axis=1))
        with torch.no_grad():
            want = model.eval()(ids).logits.numpy()
        got = np.concatenate([s[row : row + 1] for s in steps], axis=1)
        assert np.abs(got - want).max() <= TOL, f"row {name}"


def test_runtime_uses_kernel_and_matches_function_body(cpu_kernel_library, mixed, monkeypatch):
    _, _, bundle = mixed
    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(cpu_kernel_library.parent))
    with_kernel = load_bundle(bundle, multilora_kernel="on")
    body = load_bundle(bundle, multilora_kernel="off")
    assert with_kernel.describe()["multilora"] == f"cpu kernel ({cpu_kernel_library})"
    assert body.describe()["multilora"] == "onnx function body"
    prompts = [[5, 17, 42, 99], [7, 8, 9], [11, 12, 13, 14, 15], [3, 4], [200, 1], [6, 6, 6]]
    got = with_kernel.generate(prompts, adapters=BATCH, max_new_tokens=6, ignore_eos=True)
    want = body.generate(prompts, adapters=BATCH, max_new_tokens=6, ignore_eos=True)
    assert got.token_ids == want.token_ids


def test_kernel_on_without_library_is_one_line_error(mixed, monkeypatch, tmp_path):
    _, _, bundle = mixed
    monkeypatch.setattr(plugins._library, "DEFAULT_BUILD_DIR", tmp_path / "none")
    monkeypatch.setattr(plugins._library, "PACKAGE_DIR", tmp_path / "none")
    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(tmp_path))
    with pytest.raises(InferenceError, match="libpeft_multilora_ort.so not found") as info:
        load_bundle(bundle, multilora_kernel="on")
    assert "\n" not in str(info.value)
    assert load_bundle(bundle).describe()["multilora"] == "onnx function body"
    with pytest.raises(InferenceError, match="unknown multilora_kernel 'fast'"):
        load_bundle(bundle, multilora_kernel="fast")


def test_native_slot_copy_writes_the_same_banks(cpu_kernel_library, mixed, monkeypatch):
    _, _, bundle = mixed
    manifest = load_manifest(bundle)
    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(cpu_kernel_library.parent))
    host_copy.region_copier.cache_clear()
    try:
        native = AdapterStore(bundle, manifest)
    finally:
        host_copy.region_copier.cache_clear()
    assert native._copy_regions is not None
    plain = AdapterStore(bundle, manifest)
    plain._copy_regions = None
    for store in (native, plain):
        for slot, name in enumerate(["lo", "do", "ia", "r8", "lo"], start=1):
            store.write_slot(slot, store.load(name))
    for name in native.specs:
        assert np.array_equal(native.bank(name), plain.bank(name)), name
    assert any(not np.array_equal(native.bank(n)[1], native.bank(n)[0]) for n in native.specs)


def test_region_copier_splits_large_copies_exactly(cpu_kernel_library, monkeypatch):
    """Above 4 MiB per thread the copy runs on several threads; every byte must land."""
    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(cpu_kernel_library.parent))
    host_copy.region_copier.cache_clear()
    try:
        copy = host_copy.region_copier()
    finally:
        host_copy.region_copier.cache_clear()
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 300_000, size=120)  # odd sizes: unaligned heads and tails
    sources = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]
    targets = [np.zeros(n + 1, dtype=np.uint8)[1:] for n in sizes]  # misaligned starts
    assert sum(int(n) for n in sizes) > 12 << 20
    copy(
        np.array([t.ctypes.data for t in targets], dtype=np.uintp),
        np.array([s.ctypes.data for s in sources], dtype=np.uintp),
        sizes.astype(np.uintp),
    )
    for source, target in zip(sources, targets, strict=True):
        assert np.array_equal(source, target)


def test_region_copier_is_none_without_the_library(monkeypatch, tmp_path):
    monkeypatch.setattr(plugins._library, "DEFAULT_BUILD_DIR", tmp_path / "none")
    monkeypatch.setattr(plugins._library, "PACKAGE_DIR", tmp_path / "none")
    monkeypatch.delenv(plugins.PLUGIN_DIR_ENV, raising=False)
    host_copy.region_copier.cache_clear()
    try:
        assert host_copy.region_copier() is None
    finally:
        host_copy.region_copier.cache_clear()


def test_kernel_on_for_a_graph_it_cannot_run_is_one_line_error(
    cpu_kernel_library, mixed, monkeypatch
):
    _, _, bundle = mixed
    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(cpu_kernel_library.parent))
    graph = bundle / load_manifest(bundle).graph.file
    with pytest.raises(InferenceError, match="needs an fp32 runtime-adapter bundle on device"):
        OrtBackend(graph, OrtOptions(multilora_kernel="on"), multilora_fp32=False)
    assert OrtBackend(graph, OrtOptions(), multilora_fp32=False).multilora_library is None
