"""Swap the traced graph's float weights for their block-quantized form.

The dynamo exporter folds each `nn.Linear` weight's transpose into an anonymous initializer,
so layers are found by value: every 2-D float initializer feeding a MatMul or Gemm is hashed
and matched against the dequantized weights `apply.quantize_model` put into the model (the
traced values are exactly those). A matched MatMul becomes either ONNX Runtime's
`MatMulNBits` (packed codes, scales, zero points) or a block-wise `DequantizeLinear` feeding
the same MatMul (standard ONNX, opset 21). Every quantized layer must be found once or more;
one that is not found is a bug, reported before the bundle is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from peft_export.bundle.graph_file import load_graph
from peft_export.bundle.manifest import Quantization, QuantizedModule
from peft_export.exporter.errors import ExportError
from peft_export.exporter.quantize.apply import QuantizedModel
from peft_export.exporter.quantize.blocks import BlockQuantized
from peft_export.exporter.quantize.pack import pack_shared_inputs
from peft_export.exporter.quantize.rtn import pack_codes, unpack_codes

MS_DOMAIN = "com.microsoft"
EMBEDDING_KEY = "embedding"
"""Key of the token table's record in `quantize_graph`'s result."""


@dataclass(frozen=True)
class Match:
    """A node input that holds a quantized layer's weight, as [K, N] or [N, K] (transposed)."""

    path: str
    transposed: bool


def _digest(array: np.ndarray) -> str:
    data = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(repr(data.shape).encode() + data.tobytes()).hexdigest()


def quantize_graph(model: onnx.ModelProto, quantized: QuantizedModel) -> dict[str, dict[str, str]]:
    """Rewrite `model` in place; returns, per module path, the names of its graph tensors."""
    wanted: dict[str, Match] = {}
    for path, block in quantized.blocks.items():
        weight = block.dequantize()
        wanted[_digest(weight.T)] = Match(path, transposed=False)
        wanted.setdefault(_digest(weight), Match(path, transposed=True))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    transposes = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Transpose" and n.input[0] in initializers and _is_2d_swap(n)
    }
    matches: dict[str, Match] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in matches:
            continue
        tensor = initializers.get(transposes.get(name, name))
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2:
            continue
        array = numpy_helper.to_array(tensor)
        match = wanted.get(_digest(array.T if name in transposes else array))
        if match is not None:
            matches[name] = match
    found = {m.path for m in matches.values()}
    missing = sorted(set(quantized.blocks) - found)
    if missing:
        raise ExportError(
            f"quantization could not find {len(missing)} layer(s) in the traced graph "
            f"(first: {missing[0]}); report this with the model used, or --quant-skip them"
        )
    records: dict[str, dict[str, str]] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        match = matches.get(node.input[1]) if len(node.input) > 1 else None
        if match is None or node.op_type not in ("MatMul", "Gemm"):
            new_nodes.append(node)
            continue
        block = quantized.blocks[match.path]
        if match.path not in records:
            records[match.path] = _add_tensors(graph, match.path, block, quantized.scheme)
        new_nodes.extend(_replace(node, match, block, records[match.path], quantized.scheme))
    if quantized.embedding is not None:
        path, block = quantized.embedding
        head = next((p for p, b in quantized.blocks.items() if b is block), None)
        scheme = quantized.scheme
        shares = scheme.graph_format == "matmulnbits" and scheme.tied_table == "shared"
        shared = records.get(head) if shares else None
        embedding_names = _quantize_gather(graph, new_nodes, initializers, path, block, shared)
        replaced_extra = {embedding_names.pop("replaced")}
    else:
        embedding_names, replaced_extra = None, set()
    used = {name for node in new_nodes for name in node.input}
    new_nodes = [
        n
        for n in new_nodes
        if n.op_type != "Transpose" or n.output[0] not in transposes or n.output[0] in used
    ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input}
    replaced = set(matches) | {transposes[name] for name in matches if name in transposes}
    replaced |= replaced_extra
    kept = [t for t in graph.initializer if t.name in used or t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if quantized.scheme.graph_format == "matmulnbits" or embedding_names:
        _import_domain(model, MS_DOMAIN, 1)
    if embedding_names:
        records[EMBEDDING_KEY] = embedding_names
    return records


def _quantize_gather(
    graph: onnx.GraphProto,
    nodes: list[onnx.NodeProto],
    initializers: dict[str, onnx.TensorProto],
    path: str,
    block: BlockQuantized,
    shared: dict[str, str] | None,
) -> dict[str, str]:
    """Turn the token table's Gather into ONNX Runtime's GatherBlockQuantized (rows on demand).

    Codes are INT4 (signed, zero point 0) or uint8 (zero point 128, the op's default), the
    same values as `block`; the table is found by value like the linear weights. `shared`:
    the names of the tied head's MatMulNBits tensors, whose [N, blocks, bytes] codes the
    gather reads too when `--quant-tied-table shared` (scheme.TIED_TABLES says why it is not
    the default).
    """
    want = _digest(block.dequantize())
    table = next(
        (
            name
            for name, t in initializers.items()
            if t.data_type == onnx.TensorProto.FLOAT
            and tuple(t.dims) == block.shape
            and _digest(numpy_helper.to_array(t)) == want
        ),
        None,
    )
    gathers = [n for n in nodes if n.op_type == "Gather" and n.input and n.input[0] == table]
    if table is None or not gathers:
        raise ExportError(
            f"quantization could not find the token table {path} in the traced graph; "
            "report this with the model used, or --quant-skip it"
        )
    if any(a.name == "axis" and a.i != 0 for n in gathers for a in n.attribute):
        raise ExportError(f"{path}: the table is gathered along axis != 0; report this bug")
    if shared is not None and not shared["zero_points"]:
        return _gather_shared(graph, nodes, gathers, path, block, shared) | {"replaced": table}
    names = {"weight": f"{path}.qweight", "scales": f"{path}.scales", "zero_points": ""}
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block.block_size}
    if block.bits == 4:
        signed = block.codes.astype(np.int16) - 8
        codes = _int_tensor(names["weight"], onnx.TensorProto.INT4, signed, 4)
    else:
        codes = numpy_helper.from_array(block.codes, names["weight"])
        attributes["bits"] = 8
    graph.initializer.extend([codes, numpy_helper.from_array(block.scales, names["scales"])])
    for node in gathers:
        quantized = helper.make_node(
            "GatherBlockQuantized",
            [names["weight"], node.input[1], names["scales"]],
            list(node.output),
            name=f"{node.name or path}_Q{block.bits}",
            domain=MS_DOMAIN,
            **attributes,
        )
        nodes[nodes.index(node)] = quantized
    return {**names, "replaced": table}


def _gather_shared(
    graph: onnx.GraphProto,
    nodes: list[onnx.NodeProto],
    gathers: list[onnx.NodeProto],
    path: str,
    block: BlockQuantized,
    head: dict[str, str],
) -> dict[str, str]:
    """The table's gather over the head's own MatMulNBits codes ([N, blocks, bytes], packed
    unsigned with the implicit zero point, which GatherBlockQuantized reads as uint8 data),
    blocks along the last axis; scales get the matching [N, blocks, 1] shape (a small copy),
    and the gathered [..., blocks, block] rows are reshaped to [..., hidden]."""
    names = {"weight": head["weight"], "scales": f"{path}.scales", "zero_points": ""}
    scales = block.scales.reshape(block.shape[0], -1, 1)
    shape = f"{path}.row_shape"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(scales), names["scales"]),
            numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), shape),
        ]
    )
    for node in gathers:
        rows = f"{node.output[0]}_blocks"
        quantized = helper.make_node(
            "GatherBlockQuantized",
            [names["weight"], node.input[1], names["scales"]],
            [rows],
            name=f"{node.name or path}_Q{block.bits}",
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=2,
            block_size=block.block_size,
            bits=block.bits,
        )
        reshape = helper.make_node("Reshape", [rows, shape], list(node.output))
        at = nodes.index(node)
        nodes[at : at + 1] = [quantized, reshape]
    return names


def _is_2d_swap(node: onnx.NodeProto) -> bool:
    perm = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), None)
    return perm is None or list(perm) == [1, 0]


def _add_tensors(
    graph: onnx.GraphProto, path: str, block: BlockQuantized, scheme
) -> dict[str, str]:
    """Add the layer's codes, scales and zero points as initializers; returns their names."""
    n, k = block.shape
    blocks = k // block.block_size
    names = {"weight": f"{path}.qweight", "scales": f"{path}.scales", "zero_points": ""}
    default_zero = not block.float_zero_points and bool(
        np.all(block.zero_points == 1 << (block.bits - 1))
    )
    if scheme.graph_format == "matmulnbits":
        packed = pack_codes(block.codes, block.bits).reshape(n, blocks, -1)
        tensors = [
            numpy_helper.from_array(packed, names["weight"]),
            numpy_helper.from_array(block.scales, names["scales"]),
        ]
        if not default_zero:
            names["zero_points"] = f"{path}.zero_points"
            zero = block.zero_points
            if not block.float_zero_points:
                zero = pack_codes(zero, block.bits)
            tensors.append(numpy_helper.from_array(zero, names["zero_points"]))
    else:
        if not default_zero:
            raise ExportError(
                f"{path}: DequantizeLinear takes symmetric blocks only (TensorRT needs zero "
                "points of 0); report this as a bug (such blocks are re-quantized for qdq)"
            )
        # Signed codes with the implicit zero point 0: the same values as unsigned codes with
        # zero point 2**(bits-1), in the form TensorRT builds as weight-only quantization.
        qtype = onnx.TensorProto.INT4 if block.bits == 4 else onnx.TensorProto.INT8
        signed = block.codes.T.astype(np.int16) - (1 << (block.bits - 1))  # [K, N]: MatMul's B
        tensors = [
            _int_tensor(names["weight"], qtype, signed, block.bits),
            numpy_helper.from_array(np.ascontiguousarray(block.scales.T), names["scales"]),
        ]
    graph.initializer.extend(tensors)
    return names


def _int_tensor(name: str, qtype: int, values: np.ndarray, bits: int) -> onnx.TensorProto:
    """Signed integers as a raw INT4 (two's-complement nibbles, low first) or INT8 tensor."""
    raw = np.ascontiguousarray(values, dtype=np.int16).astype(np.uint8) & ((1 << bits) - 1)
    data = pack_codes(raw.reshape(1, -1), 4).tobytes() if bits == 4 else raw.tobytes()
    return helper.make_tensor(name, qtype, list(values.shape), data, raw=True)


def _replace(
    node: onnx.NodeProto, match: Match, block: BlockQuantized, names: dict[str, str], scheme
) -> list[onnx.NodeProto]:
    n, k = block.shape
    gemm = _gemm_attributes(node) if node.op_type == "Gemm" else None
    transposed = match.transposed if gemm is None else bool(gemm.get("transB", 0))
    if transposed != match.transposed:
        raise ExportError(f"{match.path}: the graph uses its weight transposed; report this bug")
    if match.transposed and gemm is None:
        raise ExportError(f"{match.path}: a MatMul on a transposed weight; report this bug")
    # A Gemm with transB (torch's linear on a 2-D input, e.g. Qwen2-MoE's shared expert) is
    # A·Wᵀ: MatMulNBits' own form, and a MatMul layout Gemm once transB is dropped.
    if scheme.graph_format == "matmulnbits":
        inputs = [node.input[0], names["weight"], names["scales"], names["zero_points"]]
        if gemm is not None and len(node.input) > 2 and node.input[2]:
            inputs += ["", node.input[2]]
        attributes = {"K": k, "N": n, "bits": block.bits, "block_size": block.block_size}
        if scheme.accuracy_level:
            attributes["accuracy_level"] = scheme.accuracy_level
        while inputs and not inputs[-1]:
            inputs.pop()
        return [
            helper.make_node(
                "MatMulNBits",
                inputs,
                list(node.output),
                name=f"{node.name or match.path}_Q{block.bits}",
                domain=MS_DOMAIN,
                **attributes,
            )
        ]
    dequantized = f"{names['weight']}.dequantized"
    dq = helper.make_node(
        "DequantizeLinear",
        [names["weight"], names["scales"]],
        [dequantized],
        name=f"{node.name or match.path}_DQ",
        axis=0,
        block_size=block.block_size,
    )
    inputs = list(node.input)
    inputs[1] = dequantized
    rewired = helper.make_node(node.op_type, inputs, list(node.output), name=node.name)
    rewired.attribute.extend(a for a in node.attribute if a.name != "transB")
    return [dq, rewired]


def _gemm_attributes(node: onnx.NodeProto) -> dict[str, float | int]:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0:
        raise ExportError(f"Gemm {node.name} has transA/alpha; report this as a bug")
    if attributes.get("beta", 1.0) != 1.0:
        raise ExportError(f"Gemm {node.name} has beta != 1; report this as a bug")
    return attributes


def _import_domain(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def read_blocks(model: onnx.ModelProto, quantization: Quantization) -> dict[str, BlockQuantized]:
    """The blocks stored in a quantized graph, by module path (what `verify` dequantizes)."""
    initializers = {t.name: t for t in model.graph.initializer}
    blocks = {}
    # Layers packed into one MatMulNBits share its tensors: unpack them once.
    read: dict[tuple[str, str, str], BlockQuantized] = {}
    for path, record in quantization.modules.items():
        key = (record.weight, record.scales, record.zero_points)
        block = read.get(key)
        if block is None:
            names = dict(zip(("weight", "scales", "zero_points"), key, strict=True))
            block = read[key] = _read_block(
                initializers, names, record.bits, quantization.block_size, quantization.format
            )
        blocks[path] = block.rows(*record.rows) if record.rows else block
    for path, record in quantization.embedding.items():
        blocks[path] = _read_gather_block(initializers, record, quantization.block_size)
    return blocks


def _read_gather_block(
    initializers: dict[str, onnx.TensorProto], record: QuantizedModule, block_size: int
) -> BlockQuantized:
    weight = initializers[record.weight]
    if len(weight.dims) == 3:  # the tied head's MatMulNBits codes (_gather_shared)
        names = {"weight": record.weight, "scales": record.scales}
        return _read_block(initializers, names, record.bits, block_size, "matmulnbits")
    rows, cols = weight.dims
    half = 1 << (record.bits - 1)
    if record.bits == 4:
        codes = (_signed_values(weight, 4).reshape(rows, cols) + half).astype(np.uint8)
    else:
        codes = numpy_helper.to_array(weight)
    scales = numpy_helper.to_array(initializers[record.scales]).astype(np.float32)
    zero = np.full(scales.shape, half, dtype=np.uint8)
    return BlockQuantized(codes, scales, zero, record.bits, block_size, source="graph")


def _read_block(initializers, names, bits, block_size, graph_format) -> BlockQuantized:
    weight = initializers[names["weight"]]
    scales = numpy_helper.to_array(initializers[names["scales"]]).astype(np.float32)
    zero_name = names.get("zero_points", "")
    if graph_format == "matmulnbits":
        n, blocks = weight.dims[0], weight.dims[1]
        packed = numpy_helper.to_array(weight).reshape(n, -1)
        codes = unpack_codes(packed, bits, blocks * block_size)
        scales = scales.reshape(n, blocks)
        if not zero_name:
            zero = np.full((n, blocks), 1 << (bits - 1), dtype=np.uint8)
        else:
            zero_array = numpy_helper.to_array(initializers[zero_name])
            if zero_array.dtype == np.float32:
                zero = zero_array.reshape(n, blocks)
            else:
                zero = unpack_codes(zero_array.reshape(n, -1), bits, blocks)
        return BlockQuantized(codes, scales, zero, bits, block_size, source="graph")
    k, n = weight.dims
    half = 1 << (bits - 1)
    codes = (_signed_values(weight, bits).reshape(k, n).T + half).astype(np.uint8)
    zero = np.full((n, k // block_size), half, dtype=np.uint8)
    return BlockQuantized(
        np.ascontiguousarray(codes),
        np.ascontiguousarray(scales.T),
        zero,
        bits,
        block_size,
        source="graph",
    )


def _signed_values(tensor: onnx.TensorProto, bits: int) -> np.ndarray:
    count = int(np.prod(tensor.dims))
    raw = np.frombuffer(tensor.raw_data, dtype=np.uint8)
    raw = raw[:count] if bits == 8 else unpack_codes(raw.reshape(1, -1), 4, count)[0]
    values = raw.astype(np.int16)
    return np.where(values >= (1 << (bits - 1)), values - (1 << bits), values)


def quantize_graph_file(path: Path, quantized: QuantizedModel) -> Quantization:
    """Rewrite the graph file at `path` (and its .data) in place; returns the manifest record."""
    from peft_export.exporter.graph.onnx_export import check_graph

    model = load_graph(path)
    records = quantize_graph(model, quantized)
    embedding = records.pop(EMBEDDING_KEY, None)
    if quantized.scheme.graph_format == "matmulnbits":
        records = pack_shared_inputs(model, records)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    # Always beside the graph, whatever its size: ONNX Runtime then maps the file instead of
    # parsing every weight into memory first (SmolLM2 int8: ~100 MB less resident memory).
    onnx.save(model, str(path), save_as_external_data=True, location=data.name)
    check_graph(
        path,
        "the quantized graph",
        "report this with the model used, or export with --quantize none",
    )
    scheme = quantized.scheme
    return Quantization(
        bits=scheme.bits,
        block_size=scheme.block_size,
        format=scheme.graph_format,
        accuracy_level=scheme.accuracy_level,
        embedding=_embedding_record(embedding, quantized),
        modules={
            module: QuantizedModule(
                source=quantized.blocks[module].source, bits=quantized.blocks[module].bits, **names
            )
            for module, names in sorted(records.items())
        },
        kept=dict(quantized.kept),
    )


def _embedding_record(
    names: dict[str, str] | None, quantized: QuantizedModel
) -> dict[str, QuantizedModule]:
    if names is None or quantized.embedding is None:
        return {}
    path, block = quantized.embedding
    return {path: QuantizedModule(source=block.source, bits=block.bits, **names)}
