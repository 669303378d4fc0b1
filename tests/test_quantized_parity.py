"""Quantized bases (int8 / int4 weights, float adapters): parity with PyTorch/PEFT.

The reference runs PyTorch/PEFT on the very weights the bundle's graph holds. They are read
back here by ONNX Runtime itself (each quantized layer's own MatMulNBits or DequantizeLinear
node, run on an identity matrix), not by peft-export's dequantizer, so a wrong packing or
zero point anywhere fails these tests. Merged bundles merge the adapter first, then quantize.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from peft import PeftModel
from prompt_helpers import check_row, run_rows
from tiny import make_adapter, save_tiny_tokenizer, tiny_model

from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
from peft_export.exporter.quantize.apply import quantize_model
from peft_export.exporter.quantize.scheme import ACCURACY_EXACT, ACCURACY_FAST, QuantScheme
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.session import load_bundle

PROMPTS = [[5, 17, 33, 80, 120, 9, 44], [1, 42, 7]]
NEW_TOKENS = 6
RUNTIME_METHODS = ("lora", "dora", "ia3", "prefix_tuning", "prompt_tuning")


def ort_weights(bundle_dir) -> dict[str, np.ndarray]:
    """Each quantized layer's weight [out, in] as ONNX Runtime computes it from the graph."""
    manifest = load_manifest(bundle_dir)
    model = onnx.load(str(bundle_dir / manifest.graph.file))
    initializers = {t.name: t for t in model.graph.initializer}
    weights = {}
    for path, record in manifest.quantization.modules.items():
        linear = (n for n in model.graph.node if n.op_type != "GatherBlockQuantized")
        node = next(n for n in linear if record.weight in n.input)
        k = _input_features(node, initializers, record.weight)
        if node.op_type == "MatMulNBits":
            inputs = ["x", *node.input[1:4]]
            probe = helper.make_node(node.op_type, inputs, ["y"], domain=node.domain)
            probe.attribute.extend(a for a in node.attribute if a.name != "accuracy_level")
        else:
            probe = helper.make_node(node.op_type, list(node.input), ["y"])
            probe.attribute.extend(node.attribute)
        used = [initializers[name] for name in probe.input if name in initializers]
        nbits = node.op_type == "MatMulNBits"
        graph = helper.make_graph(
            [probe],
            "probe",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [k, k])] if nbits else [],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            used,
        )
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        options = ort.SessionOptions()
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        session = ort.InferenceSession(
            helper.make_model(graph, opset_imports=opsets).SerializeToString(), options
        )
        feeds = {"x": np.eye(k, dtype=np.float32)} if nbits else {}
        weight = session.run(None, feeds)[0].T  # [K, N] -> [out, in]
        weights[path] = weight[slice(*record.rows)] if record.rows else weight
    for path, record in manifest.quantization.embedding.items():
        gathers = (n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
        node = next(n for n in gathers if record.weight in n.input)
        rows = initializers[record.weight].dims[0]
        probe = helper.make_node(
            node.op_type, [record.weight, "ids", record.scales], ["y"], domain=node.domain
        )
        probe.attribute.extend(node.attribute)
        graph = helper.make_graph(
            [probe],
            "probe",
            [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [rows])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [initializers[record.weight], initializers[record.scales]],
        )
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        session = ort.InferenceSession(
            helper.make_model(graph, opset_imports=opsets).SerializeToString()
        )
        table = session.run(None, {"ids": np.arange(rows, dtype=np.int64)})[0]
        weights[path] = table.reshape(rows, -1)  # a tied head's codes gather as [rows, blocks, 32]
    return weights


def _input_features(node, initializers, weight_name: str) -> int:
    if node.op_type == "MatMulNBits":
        return next(a.i for a in node.attribute if a.name == "K")
    return initializers[weight_name].dims[0]


@torch.no_grad()
def with_weights(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    for path, weight in weights.items():
        module = model.get_submodule(path)
        value = torch.from_numpy(np.ascontiguousarray(weight))
        module.weight.copy_(value.T if type(module).__name__ == "Conv1D" else value)
    return model


@pytest.fixture(
    scope="module",
    params=[("llama", 4, False), ("qwen2", 8, True), ("gpt2", 4, True), ("llama", 8, True)],
    ids=["llama-int4", "qwen2-int8-embedding", "gpt2-int4-tied-embedding", "llama-int8-embedding"],
)
def quantized(request, tmp_path_factory):
    arch, bits, embedding = request.param
    tmp = tmp_path_factory.mktemp(f"quant-{arch}-{bits}")
    base = tiny_model(arch)
    tokenizer = save_tiny_tokenizer(tmp / "tokenizer")
    dirs = {m: make_adapter(base, m, tmp, seed=3 + i) for i, m in enumerate(RUNTIME_METHODS)}
    scheme = QuantScheme.parse(f"int{bits}", ort_only=embedding)
    export_bundle(
        InMemoryBase(base, tokenizer),
        [("lora", dirs["lora"])],
        out=tmp / "merged",
        quantize=scheme,
    )
    export_bundle(
        InMemoryBase(base, tokenizer),
        list(dirs.items()),
        out=tmp / "runtime",
        mode="runtime",
        planners=[plan_lora_banks, plan_prompt_inputs],
        options={"prefix_max_len": 8},
        quantize=scheme,
    )
    return arch, bits, base, dirs, tmp, embedding


def test_manifest_records_every_linear_layer(quantized):
    _, bits, base, _, tmp, embedding = quantized
    for mode in ("merged", "runtime"):
        record = load_manifest(tmp / mode).quantization
        assert record.bits == bits and record.block_size == 32
        linear = {n for n, m in base.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
        assert set(record.modules) == linear
        assert {m.source for m in record.modules.values()} == {"rtn"}
        table = {n for n, m in base.named_modules() if m is base.get_input_embeddings()}
        assert set(record.embedding) == (table if embedding else set())


def test_a_quantized_table_has_its_own_codes_by_default(quantized):
    """An ONNX Runtime-only graph gathers the table from its own codes, tied or not
    (`--quant-tied-table separate`: less memory while running than sharing the head's)."""
    _, _, base, _, tmp, embedding = quantized
    record = load_manifest(tmp / "runtime").quantization
    heads = {m.weight for m in record.modules.values()}
    assert all(table.weight not in heads for table in record.embedding.values())
    assert bool(record.embedding) == embedding


def test_a_shared_tied_table_is_stored_once_and_matches_peft(tmp_path):
    """`--quant-tied-table shared`: the table's Gather reads the tied head's MatMulNBits codes."""
    base = tiny_model("gpt2")
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    lora = make_adapter(base, "lora", tmp_path, seed=3)
    export_bundle(
        InMemoryBase(base, save_tiny_tokenizer(tmp_path / "tokenizer")),
        [("lora", lora)],
        out=tmp_path / "merged",
        quantize=QuantScheme.parse("int4", ort_only=True, tied_table="shared"),
    )
    record = load_manifest(tmp_path / "merged").quantization
    (table,) = record.embedding.values()
    assert table.weight == record.modules["lm_head"].weight
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(lora)).merge_and_unload()
    reference = with_weights(merged.eval(), ort_weights(tmp_path / "merged"))
    bundle = load_bundle(tmp_path / "merged", quant_accuracy=ACCURACY_EXACT)
    runs = run_rows(bundle, PROMPTS, [None, None], NEW_TOKENS)
    for prompt, run in zip(PROMPTS, runs, strict=True):
        check_row(run, reference, prompt)


def test_layers_reading_one_input_share_one_matmulnbits(quantized):
    """ONNX Runtime-only graphs compute q/k/v (and gate/up) in one MatMulNBits each."""
    arch, _, base, _, tmp, embedding = quantized
    record = load_manifest(tmp / "merged").quantization
    model = onnx.load(str(tmp / "merged" / "model.onnx"), load_external_data=False)
    calls = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    if not embedding:  # portable graphs keep one DequantizeLinear per layer
        assert calls == 0 and not any(m.rows for m in record.modules.values())
        return
    layers = base.config.num_hidden_layers
    groups = {"gpt2": 0, "llama": 2, "qwen2": 2}[arch]  # gpt2: c_attn is q/k/v in one
    spans: dict[str, list[tuple[int, ...]]] = {}
    for module in record.modules.values():
        if module.rows:
            spans.setdefault(module.weight, []).append(tuple(module.rows))
    assert len(spans) == groups * layers
    packed_layers = sum(len(rows) for rows in spans.values())
    assert calls == len(record.modules) - packed_layers + len(spans)
    for rows in spans.values():
        starts, stops = zip(*sorted(rows), strict=True)
        assert starts[0] == 0 and list(starts[1:]) == list(stops[:-1])


def test_graph_computes_exactly_the_quantizers_blocks(quantized):
    """Each layer's weight as ONNX Runtime reads it from the graph (packed layers: their
    rows) is the quantizer's dequantized blocks, bit for bit."""
    _, bits, base, _, tmp, embedding = quantized
    blocks = quantize_model(
        copy.deepcopy(base), QuantScheme.parse(f"int{bits}", ort_only=embedding)
    ).blocks
    graph = ort_weights(tmp / "runtime")
    for path, block in blocks.items():
        np.testing.assert_array_equal(graph[path], block.dequantize(), err_msg=path)


def test_graph_holds_no_float_copy_of_a_quantized_weight(quantized):
    _, _, base, _, tmp, embedding = quantized
    model = onnx.load(str(tmp / "runtime" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    qdq = not embedding  # an ONNX Runtime-only graph holds MatMulNBits itself (auto)
    assert ("DequantizeLinear" in ops) == qdq and ("MatMulNBits" in ops) != qdq
    assert (tmp / "runtime" / "model.onnx.data").is_file()
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    shapes = {tuple(t.dims) for t in floats}
    embed = tuple(base.get_input_embeddings().weight.shape)
    linear = {tuple(m.weight.shape) for m in base.modules() if type(m).__name__ == "Linear"}
    weights = linear | {s[::-1] for s in linear}
    weights = weights if embedding else weights - {embed}
    assert not shapes & weights, f"float weights left: {shapes & weights}"


def test_merged_lora_matches_peft_on_the_graph_weights(quantized):
    _, _, base, dirs, tmp, _ = quantized
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["lora"])).merge_and_unload()
    reference = with_weights(merged.eval(), ort_weights(tmp / "merged"))
    bundle = load_bundle(tmp / "merged", quant_accuracy=ACCURACY_EXACT)
    for prompt, run in zip(
        PROMPTS, run_rows(bundle, PROMPTS, [None, None], NEW_TOKENS), strict=True
    ):
        check_row(run, reference, prompt)


def test_runtime_adapters_match_peft_on_the_graph_weights_in_one_mixed_batch(quantized):
    _, _, base, dirs, tmp, _ = quantized
    quantized_base = with_weights(copy.deepcopy(base), ort_weights(tmp / "runtime"))
    names = [None, *RUNTIME_METHODS]
    prompts = [PROMPTS[i % 2] for i in range(len(names))]
    bundle = load_bundle(tmp / "runtime", quant_accuracy=ACCURACY_EXACT)
    runs = run_rows(bundle, prompts, names, NEW_TOKENS)
    for name, prompt, run in zip(names, prompts, runs, strict=True):
        reference = quantized_base
        if name is not None:
            reference = PeftModel.from_pretrained(copy.deepcopy(quantized_base), str(dirs[name]))
        check_row(run, reference.eval(), prompt)


def test_served_accuracy_level_quantizes_activations_and_verify_level_does_not(quantized):
    """The bundle serves at its own level (int8 activations); exact runs at float32 compute."""
    _, _, _, _, tmp, _ = quantized
    assert load_manifest(tmp / "merged").quantization.accuracy_level == ACCURACY_FAST
    runs = {
        level: run_rows(load_bundle(tmp / "merged", quant_accuracy=level), PROMPTS[:1], [None], 2)
        for level in (None, ACCURACY_FAST, ACCURACY_EXACT)
    }
    np.testing.assert_array_equal(runs[None][0].logits, runs[ACCURACY_FAST][0].logits)
    gap = np.abs(runs[ACCURACY_FAST][0].logits - runs[ACCURACY_EXACT][0].logits).max()
    assert 0 < gap < 0.25  # int8 activations: small, never zero


def test_dora_added_later_takes_its_base_weights_from_the_quantized_graph(quantized, tmp_path):
    """No fp32 copy of quantized target weights is kept; `adapters add` reads the graph's."""
    import shutil

    from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter

    _, _, base, dirs, tmp, _ = quantized
    bundle = shutil.copytree(tmp / "runtime", tmp_path / "bundle")
    assert not (bundle / "adapters" / "_base_targets.safetensors").exists()
    second = make_adapter(base, "dora", tmp_path, name="later", seed=11)
    add_adapter(bundle, "later", second)
    reference = PeftModel.from_pretrained(
        with_weights(copy.deepcopy(base), ort_weights(bundle)), str(second)
    )
    runs = run_rows(
        load_bundle(bundle, quant_accuracy=ACCURACY_EXACT), PROMPTS[:1], ["later"], NEW_TOKENS
    )
    check_row(runs[0], reference.eval(), PROMPTS[0])
