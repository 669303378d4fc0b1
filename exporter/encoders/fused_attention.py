"""Encoder graph rewrites for ONNX Runtime's CPU provider, run before the shared ones.

transformers' fusion pass unfuses every cache-less `MultiHeadAttention` on CPU back into
MatMul + Softmax, and packs sibling projections into one MatMul + Split. A merged BERT-like
encoder's layers become packed `Attention` before that. In a runtime bundle a LoRA delta on
the query or value keeps the packed op out (as ModernBERT's fused Wqkv does in both modes),
and what the pass leaves measured slower on all-MiniLM-L6-v2 at batch 32 x 128 tokens, 2
threads (runtime bundle, median of 20): 538 ms as left, 502 ms with one `MultiHeadAttention`
per layer and the projections unpacked (`Split` copied the packed output: ~2 ms a layer);
batch 1 unchanged (25-28 ms either way). Layers that do not match exactly keep their ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from peft_export.exporter.graph.ort_rewrites import producer_of, replace_value

QUERY_PERM = [0, 2, 1, 3]
KEY_PERM = [0, 2, 3, 1]


def attend_in_one_op(model: Any) -> None:
    """softmax(q_heads @ k_heads^T * scale + bias) @ v_heads -> MultiHeadAttention(q, k, v).

    The op reads and writes [batch, seq, heads * head_dim], so the per-head reshapes and
    transposes go too. Its attention bias must be [batch or 1, heads or 1, seq, kv_seq]; the
    graph's mask bias ([batch, 1, 1, kv_seq] in BERT's) is expanded over the queries once and
    shared by every layer that reads it.
    """

    expanded: dict[Any, Any] = {}
    for softmax in list(model.graph):
        if softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx"):
            continue
        found = _unfused_attention(softmax)
        if found is None:
            continue
        (query, key, value), heads, scale, bias, output = found
        if bias is not None:
            if bias not in expanded:
                name = f"attention_bias_{len(expanded)}"
                expanded[bias] = _over_queries(model.graph, softmax, bias, query, name)
            bias = expanded[bias]
        attributes = [ir.AttrInt64("num_heads", heads), ir.AttrFloat32("scale", scale)]
        inputs = [query, key, value, None, None, bias]
        attention = ir.Node("com.microsoft", "MultiHeadAttention", inputs, attributes)
        model.graph.insert_before(softmax, attention)
        replace_value(output, attention.outputs[0])
    if expanded and "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    RemoveUnusedNodesPass()(model)


def unpack_projections(model: Any) -> None:
    """MatMul(x, W packed) -> Split on the last axis becomes one MatMul per part.

    The fusion pass packs projections of one input to run one GEMM; at an encoder's row
    counts the Split's copy of the packed output costs more than the one GEMM saves.
    """

    for split in list(model.graph):
        if split.op_type != "Split" or split.domain not in ("", "ai.onnx"):
            continue
        parts = _packed_parts(split)
        if parts is None:
            continue
        x, packed, weights = parts
        for index, (out, weight) in enumerate(zip(split.outputs, weights, strict=True)):
            value = _initializer(model.graph, f"{packed.name}_part{index}", weight)
            matmul = ir.Node("", "MatMul", [x, value])
            model.graph.insert_before(split, matmul)
            replace_value(out, matmul.outputs[0])
    RemoveUnusedNodesPass()(model)


def _unfused_attention(softmax: Any) -> tuple[tuple[Any, Any, Any], int, float, Any, Any] | None:
    """((q, k, v), heads, scale, mask bias or None, output) of the unfused attention around
    `softmax`, or None where any piece differs from that pattern."""
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return None
    scores, bias = softmax.inputs[0], None
    add = producer_of(scores, "Add")
    if add is not None:
        scaled = next((v for v in add.inputs if producer_of(v, "Mul") is not None), None)
        if scaled is None or len(add.inputs) != 2:
            return None
        bias = add.inputs[1] if add.inputs[0] is scaled else add.inputs[0]
        if bias.shape is not None and len(bias.shape) != 4:
            return None
        scores = scaled
    mul = producer_of(scores, "Mul")
    if mul is None or len(mul.inputs) != 2:
        return None
    scale = _scalar(mul.inputs[1])
    product = producer_of(mul.inputs[0], "MatMul")
    if scale is None or product is None:
        return None
    query = _from_heads(product.inputs[0], QUERY_PERM)
    key = _from_heads(product.inputs[1], KEY_PERM)
    mixed = _only_user(softmax.outputs[0], "MatMul")
    if query is None or key is None or mixed is None or mixed.inputs[0] is not softmax.outputs[0]:
        return None
    value = _from_heads(mixed.inputs[1], QUERY_PERM)
    back = _only_user(mixed.outputs[0], "Transpose")
    if value is None or back is None or _perm(back) != QUERY_PERM:
        return None
    merge = _only_user(back.outputs[0], "Reshape")
    merged_shape = _ints(merge.inputs[1]) if merge is not None else None
    if merged_shape != [0, 0, -1] or len({query[1], key[1], value[1]}) != 1:
        return None
    states = (query[0], key[0], value[0])
    if any(s.dtype != ir.DataType.FLOAT or s.shape is None or len(s.shape) != 3 for s in states):
        return None
    return states, query[1], scale, bias, merge.outputs[0]


def _from_heads(value: Any, perm: list[int]) -> tuple[Any, int] | None:
    """(x, heads) when `value` is Transpose(Reshape(x, [0, 0, heads, -1 or head_dim]), perm)."""
    transpose = producer_of(value, "Transpose")
    if transpose is None or _perm(transpose) != perm:
        return None
    reshape = producer_of(transpose.inputs[0], "Reshape")
    shape = _ints(reshape.inputs[1]) if reshape is not None else None
    if shape is None or len(shape) != 4 or shape[:2] != [0, 0] or shape[2] <= 0:
        return None
    return reshape.inputs[0], shape[2]


def _over_queries(graph: Any, before: Any, bias: Any, query: Any, name: str) -> Any:
    """Expand(bias, [1, 1, query length, 1]) inserted before `before`: the bias broadcast over
    the query positions (layers after it read the same)."""
    length = ir.Node("", "Shape", [query], [ir.AttrInt64("start", 1), ir.AttrInt64("end", 2)])
    ones = _initializer(graph, f"{name}_ones", np.array([1, 1], np.int64))
    one = _initializer(graph, f"{name}_one", np.array([1], np.int64))
    target = ir.Node("", "Concat", [ones, length.outputs[0], one], [ir.AttrInt64("axis", 0)])
    expand = ir.Node("", "Expand", [bias, target.outputs[0]])
    expand.outputs[0].dtype = bias.dtype
    graph.insert_before(before, [length, target, expand])
    return expand.outputs[0]


def _initializer(graph: Any, name: str, array: np.ndarray) -> Any:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _packed_parts(split: Any) -> tuple[Any, Any, list[np.ndarray]] | None:
    """(x, W, W's parts) when `split` cuts the last axis of MatMul(x, constant 2-D W)
    that nothing else reads."""
    matmul = producer_of(split.inputs[0], "MatMul")
    if matmul is None or len(split.inputs) != 2 or len(split.inputs[0].uses()) != 1:
        return None
    packed, sizes = matmul.inputs[1].const_value, _ints(split.inputs[1])
    if packed is None or sizes is None or len(packed.shape) != 2:
        return None
    shape = split.inputs[0].shape
    if split.attributes.get_int("axis", 0) not in (-1, len(shape) - 1 if shape else -1):
        return None
    if sum(sizes) != packed.shape[1] or len(sizes) != len(split.outputs):
        return None
    parts = np.split(packed.numpy(), np.cumsum(sizes)[:-1], axis=1)
    parts = [np.ascontiguousarray(part) for part in parts]
    return matmul.inputs[0], matmul.inputs[1], parts


def _only_user(value: Any, op_type: str) -> Any:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    return node if node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _perm(node: Any) -> list[int]:
    return list(node.attributes.get_ints("perm", []))


def _ints(value: Any) -> list[int] | None:
    tensor = value.const_value if value is not None else None
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def _scalar(value: Any) -> float | None:
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.numpy().size != 1:
        return None
    return float(tensor.numpy().reshape(-1)[0])


ENCODER_REWRITES: tuple[Callable[[Any], None], ...] = (attend_in_one_op, unpack_projections)
"""Run before ort_rewrites.REWRITES: the LoRA-add rewrite then sees the unpacked projections."""
