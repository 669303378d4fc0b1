"""A GGUF base exported quantized: the file's own blocks land in the graph, exactly.

A tiny Llama GGUF (Q4_0, Q4_1 and Q8_0 layers, F16 / Q5_0 ones to requantize) is written
here with the `gguf` package; the graph's weights are read back by ONNX Runtime itself and
compared with gguf-py's own dequantization of the file.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from test_gguf_blocks import gguf_reference, load, write_gguf
from test_quantized_parity import ort_weights

from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.quantize.gguf_blocks import read_gguf_blocks
from peft_export.exporter.quantize.scheme import QuantScheme

CARRIED = {"Q4_0", "Q4_1", "Q8_0"}


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    weights = write_gguf(path, "llama", tied=False)
    return path, weights, load(path)


def _export(llama_gguf, tmp_path, graph_format: str, head: str = "auto"):
    path, _, model = llama_gguf
    carried = read_gguf_blocks(path, model)
    out = tmp_path / f"{graph_format}-{head}"
    export_bundle(
        InMemoryBase(model),
        out=out,
        quantize=QuantScheme.parse("int4", graph_format=graph_format, head=head),
        carried_blocks=carried.blocks,
    )
    return out, carried


def test_matmulnbits_graph_holds_the_files_blocks(llama_gguf, tmp_path):
    path, weights, _ = llama_gguf
    out, carried = _export(llama_gguf, tmp_path, "matmulnbits")
    record = load_manifest(out).quantization
    graph = ort_weights(out)
    reader = gguf.GGUFReader(path)
    checked = set()
    for weight in weights:
        module = weight.hf.removesuffix(".weight")
        qtype = weight.qtype.name
        source = record.modules[module].source
        if qtype not in CARRIED:
            assert source == "rtn", module
            continue
        assert source == f"gguf:{qtype}"
        assert record.modules[module].bits == (8 if qtype == "Q8_0" else 4)
        reference = gguf_reference(reader, weight, "llama")
        differ = np.any(graph[module] != reference, axis=1).sum()
        if carried.inexact_blocks.get(weight.hf):
            assert 0 < differ <= carried.inexact_blocks[weight.hf]
            np.testing.assert_allclose(graph[module], reference, rtol=0, atol=1e-7)
        else:
            np.testing.assert_array_equal(graph[module], reference)
        checked.add(qtype)
    assert checked == CARRIED


def test_portable_graph_carries_symmetric_blocks_and_requantizes_q4_1(llama_gguf, tmp_path):
    path, weights, _ = llama_gguf
    out, _ = _export(llama_gguf, tmp_path, "qdq")
    record = load_manifest(out).quantization
    graph = ort_weights(out)
    reader = gguf.GGUFReader(path)
    for weight in weights:
        module = weight.hf.removesuffix(".weight")
        qtype = weight.qtype.name
        if qtype in ("Q4_0", "Q8_0"):
            assert record.modules[module].source == f"gguf:{qtype}"
            np.testing.assert_array_equal(graph[module], gguf_reference(reader, weight, "llama"))
        else:
            assert record.modules[module].source == "rtn", module


@pytest.mark.parametrize(("head", "bits"), [("int8", 8), ("none", None)])
def test_quant_head_overrides_the_files_own_head_blocks(llama_gguf, tmp_path, head, bits):
    """The file's lm_head is Q4_0: --quant-head int8 requantizes it at 8 bits (the rest of the
    file's blocks stay carried), none keeps it in float."""
    path, weights, _ = llama_gguf
    out, _ = _export(llama_gguf, tmp_path, "matmulnbits", head)
    record = load_manifest(out).quantization
    reader = gguf.GGUFReader(path)
    by_name = {w.hf: w for w in weights}
    reference = gguf_reference(reader, by_name["lm_head.weight"], "llama")
    if bits is None:
        assert "lm_head" not in record.modules
        assert record.kept["lm_head"] == "--quant-head none"
        return
    assert (record.modules["lm_head"].source, record.modules["lm_head"].bits) == ("rtn", bits)
    graph = ort_weights(out)
    step = np.abs(reference).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(graph["lm_head"] - reference) <= step)
    assert np.any(graph["lm_head"] != reference)
    carried = [w for w in weights if w.qtype.name in CARRIED and w.hf != "lm_head.weight"]
    for weight in carried:
        assert record.modules[weight.hf.removesuffix(".weight")].source.startswith("gguf:")
