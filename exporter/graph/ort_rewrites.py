"""Graph rewrites for ONNX Runtime that transformers' fusion pass leaves to us.

Each takes an onnx_ir model after `fuse_for_onnxruntime`, changes only layers that match its
pattern exactly, computes what it replaces, and removes what it made unused.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from peft_export.bundle import names
from peft_export.exporter.runtime_adapters import multilora_op


def attend_to_shared_kv_heads(model: Any) -> None:
    """Feed opset-23 Attention the cache's own K/V heads instead of their repeat_kv copies.

    Grouped-query attention repeats each K/V head for its group of query heads
    (Unsqueeze(axis 2) -> Expand -> Reshape), which copies the whole cache every step; the
    Attention op takes fewer K/V heads than query heads and groups them itself, the same way.
    """

    for node in model.graph.all_nodes():
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        for index in (1, 2):
            source = _repeat_kv_source(node.inputs[index])
            if source is not None:
                node.replace_input_with(index, source)
    RemoveUnusedNodesPass()(model)


def _repeat_kv_source(value: Any) -> Any:
    """X when `value` is Reshape(Expand(Unsqueeze(X, axes=[2]))), the repeat_kv pattern."""
    reshape = value.producer() if value is not None else None
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expand = reshape.inputs[0].producer()
    if expand is None or expand.op_type != "Expand":
        return None
    unsqueeze = expand.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.inputs) < 2:
        return None
    axes = unsqueeze.inputs[1].const_value
    if axes is None or [int(a) for a in axes.numpy().reshape(-1)] != [2]:
        return None
    return unsqueeze.inputs[0]


def attend_on_packed_heads(model: Any) -> None:
    """Let each Attention take [batch, seq, heads * head_dim] and the cache itself.

    The traced layer reshapes q/k/v to [batch, heads, seq, head_dim], applies rotary, appends
    k/v to the past with Concat, attends, and transposes back: ten ops per layer that the
    opset-23 Attention (q_num_heads / kv_num_heads, past_key / past_value -> present) and
    RotaryEmbedding (num_heads) do inside their kernels. Layers that do not match exactly
    are left as they are.
    """

    for node in list(model.graph):
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            _repack_attention(model.graph, node)
    RemoveUnusedNodesPass()(model)


def producer_of(value: Any, op_type: str) -> Any:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def _to_heads(value: Any) -> tuple[Any, int] | None:
    """(X, heads) when `value` is Transpose(Reshape(X, [b, s, heads, d]), perm=[0, 2, 1, 3])."""
    transpose = producer_of(value, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = producer_of(transpose.inputs[0], "Reshape")
    shape = reshape.outputs[0].shape if reshape is not None else None
    if shape is None or len(shape) != 4 or not isinstance(shape[2], int):
        return None
    return reshape.inputs[0], shape[2]


def _rotary_of_heads(value: Any) -> tuple[Any, Any, int] | None:
    """(rotary node, X, heads) when `value` is RotaryEmbedding(Transpose(Reshape(X)))."""
    rotary = producer_of(value, "RotaryEmbedding")
    if rotary is None or rotary.domain not in ("", "ai.onnx"):
        return None
    found = _to_heads(rotary.inputs[0])
    return None if found is None else (rotary, *found)


def _appended(value: Any) -> tuple[Any, Any] | None:
    """(past, new) when `value` is Concat(past, new, axis=2) and past is a graph input."""
    concat = producer_of(value, "Concat")
    if concat is None or len(concat.inputs) != 2:
        return None
    if concat.attributes.get_int("axis") not in (2, -2):
        return None
    past, new = concat.inputs
    return (past, new) if past.is_graph_input() else None


def _repack_attention(graph: Any, node: Any) -> None:

    if len(node.inputs) not in (3, 4) or len(node.outputs) != 1:
        return
    query = _rotary_of_heads(node.inputs[0])
    keys, values = _appended(node.inputs[1]), _appended(node.inputs[2])
    if query is None or keys is None or values is None:
        return
    key = _rotary_of_heads(keys[1])
    value = _to_heads(values[1])
    users = node.outputs[0].uses()
    back = users[0].node if len(users) == 1 else None
    if key is None or value is None or back is None or back.op_type != "Transpose":
        return
    if list(back.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return
    flat_users = back.outputs[0].uses()
    flatten = flat_users[0].node if len(flat_users) == 1 else None
    if flatten is None or flatten.op_type != "Reshape":
        return
    (q_rotary, q_flat, q_heads), (k_rotary, k_flat, kv_heads) = query, key
    if value[1] != kv_heads:
        return

    def rotary(old: Any, flat: Any, heads: int) -> Any:
        attributes = {a.name: a for a in old.attributes.values() if a.name != "num_heads"}
        attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
        return ir.Node("", "RotaryEmbedding", [flat, *old.inputs[1:]], attributes.values())

    q_node, k_node = rotary(q_rotary, q_flat, q_heads), rotary(k_rotary, k_flat, kv_heads)
    attributes = {a.name: a for a in node.attributes.values()}
    attributes["q_num_heads"] = ir.AttrInt64("q_num_heads", q_heads)
    attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", kv_heads)
    mask = node.inputs[3] if len(node.inputs) == 4 else None
    inputs = [q_node.outputs[0], k_node.outputs[0], value[0], mask, keys[0], values[0]]
    attention = ir.Node("", "Attention", inputs, attributes.values(), num_outputs=3)
    graph.insert_before(node, [q_node, k_node, attention])
    output, present_key, present_value = attention.outputs
    replace_value(flatten.outputs[0], output)
    replace_value(node.inputs[1], present_key)
    replace_value(node.inputs[2], present_value)


def skip_rms_norms(model: Any) -> None:
    """RMSNormalization(Add(a, b)) -> SkipSimplifiedLayerNormalization(a, b), sum kept.

    A pre-norm decoder adds the residual right before each norm; ONNX Runtime's contrib op
    does both in one pass and also returns the sum that the next residual reads.
    """

    for norm in list(model.graph):
        if norm.op_type != "RMSNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        add = producer_of(norm.inputs[0], "Add")
        axis = norm.attributes.get_int("axis", -1)
        if add is None or len(norm.inputs) != 2 or axis != -1 or len(norm.outputs) != 1:
            continue
        a, b = add.inputs
        if a.shape is None or b.shape is None or list(a.shape) != list(b.shape):
            continue
        epsilon = ir.AttrFloat32("epsilon", norm.attributes.get_float("epsilon", 1e-5))
        fused = ir.Node(
            "com.microsoft",
            "SkipSimplifiedLayerNormalization",
            [a, b, norm.inputs[1]],
            [epsilon],
            num_outputs=4,
        )
        model.graph.insert_before(norm, fused)
        replace_value(norm.outputs[0], fused.outputs[0])
        replace_value(add.outputs[0], fused.outputs[3])
    if "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    RemoveUnusedNodesPass()(model)


def unfuse_skip_layer_norms(model: Any) -> None:
    """SkipLayerNormalization(x, skip, gamma, beta, bias) -> LayerNormalization(x + bias + skip).

    The fusion pass makes each post-norm layer's residual add one contrib op, but ONNX Runtime's
    CPU kernel for it is slower than the plain ops it replaces (2 threads: 150-260 vs 41-68 us
    at 128 x 384, 7.4-8.1 vs 3.0-7.4 ms at 4096 x 384; 8.6 vs 6.6 us at 1 x 768), so the graph
    keeps Add + LayerNormalization. Nodes whose mean or inverse-deviation outputs are read stay.
    """

    for node in list(model.graph):
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft":
            continue
        if any(
            out is not None and (out.uses() or out.is_graph_output()) for out in node.outputs[1:3]
        ):
            continue
        x, skip, gamma = node.inputs[:3]
        beta = node.inputs[3] if len(node.inputs) > 3 else None
        bias = node.inputs[4] if len(node.inputs) > 4 else None
        added = []
        if bias is not None:
            added.append(ir.Node("", "Add", [x, bias]))
            x = added[-1].outputs[0]
        added.append(ir.Node("", "Add", [x, skip]))
        total = added[-1].outputs[0]
        epsilon = ir.AttrFloat32("epsilon", node.attributes.get_float("epsilon", 1e-12))
        axis = ir.AttrInt64("axis", -1)
        inputs = [total, gamma] + ([beta] if beta is not None else [])
        norm = ir.Node("", "LayerNormalization", inputs, [axis, epsilon])
        for new in [*added, norm]:
            model.graph.insert_before(node, new)
        replace_value(node.outputs[0], norm.outputs[0])
        if len(node.outputs) > 3 and node.outputs[3] is not None:
            replace_value(node.outputs[3], total)
    RemoveUnusedNodesPass()(model)


def add_lora_deltas_in_one_node(model: Any) -> None:
    """MultiLoRA + Add -> MultiLoRAAdd{n}: base output plus LoRA delta in one node.

    Each target module costs a MultiLoRA node and an Add; on a fused graph that is about as
    many nodes again as the rest of the model (SmolLM2: 420 of 880), and at a decode step
    ONNX Runtime's cost per node is a visible share of the step. Where the fusion pass
    packed modules that share an input into one MatMul and a Split (q/k/v, gate/up), one
    node adds all their deltas before the Split. The op's function body is the MultiLoRA
    function, a Concat and the Add, so a runtime without the CPU kernel computes the same.
    """

    graph = model.graph
    arities: set[int] = set()
    grouped: set[Any] = set()
    for node in list(graph):
        if node in grouped or not _is_multilora(node):
            continue
        found = _lora_add(node)
        if found is None:
            continue
        add, base = found
        packed = _packed_members(base, node)
        if packed is None:
            fused = _multilora_add(base, [node])
            graph.insert_before(add, fused)
            replace_value(add.outputs[0], fused.outputs[0])
            arities.add(1)
            continue
        split, pairs = packed
        fused = _multilora_add(split.inputs[0], [member for member, _ in pairs])
        graph.insert_before(split, fused)
        split.replace_input_with(0, fused.outputs[0])
        for out, (member, member_add) in zip(split.outputs, pairs, strict=True):
            replace_value(member_add.outputs[0], out)
            grouped.add(member)
        arities.add(len(pairs))
    opset = model.opset_imports[""]
    for modules in sorted(arities):
        function = ir.serde.deserialize_function(multilora_op.add_function_proto(modules, opset))
        model.functions[function.identifier()] = function
    RemoveUnusedNodesPass()(model)


def _is_multilora(node: Any) -> bool:
    return node.domain == names.MULTILORA_DOMAIN and node.op_type == names.MULTILORA_OP


def _lora_add(multilora: Any) -> tuple[Any, Any] | None:
    """(Add, base) when MultiLoRA's delta is read only by Add(base, delta) of the same shape."""
    delta = multilora.outputs[0]
    uses = delta.uses()
    if len(uses) != 1 or delta.is_graph_output() or len(multilora.inputs) != 4:
        return None
    add, index = uses[0].node, uses[0].idx
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    base = add.inputs[1 - index]
    if base is delta or base.shape is None or base.shape != add.outputs[0].shape:
        return None
    return add, base


def _packed_members(base: Any, first: Any) -> tuple[Any, list[tuple[Any, Any]]] | None:
    """(Split, [(MultiLoRA, Add)] in Split order) when `base` is one output of a last-axis
    Split whose every output gets the delta of a MultiLoRA on `first`'s input and ids."""
    split = producer_of(base, "Split")
    if split is None or split.domain not in ("", "ai.onnx") or split.inputs[0].shape is None:
        return None
    axis = split.attributes.get_int("axis", 0)
    if axis not in (-1, len(split.inputs[0].shape) - 1):
        return None
    if len(split.outputs) > names.MULTILORA_ADD_MAX_MODULES:
        return None
    pairs = []
    for out in split.outputs:
        uses = out.uses()
        if len(uses) != 1 or out.is_graph_output():
            return None
        add = uses[0].node
        delta = add.inputs[1 - uses[0].idx] if add.op_type == "Add" else None
        member = delta.producer() if delta is not None else None
        if member is None or not _is_multilora(member) or _lora_add(member) != (add, out):
            return None
        same = member.inputs[0] is first.inputs[0] and member.inputs[3] is first.inputs[3]
        width = member.inputs[2].shape[1] if member.inputs[2].shape is not None else None
        if not same or width is None or out.shape[-1] != width:
            return None
        pairs.append((member, add))
    return split, pairs


def _multilora_add(base: Any, members: list[Any]) -> Any:
    """MultiLoRAAdd{n}(x, ids, base, banks...) for MultiLoRA nodes on one x and ids."""
    x, ids = members[0].inputs[0], members[0].inputs[3]
    banks = [bank for member in members for bank in member.inputs[1:3]]
    node = ir.Node(
        names.MULTILORA_DOMAIN, names.multilora_add_op(len(members)), [x, ids, base, *banks]
    )
    node.outputs[0].shape, node.outputs[0].dtype = base.shape, base.dtype
    return node


def replace_value(old: Any, new: Any) -> None:
    """Every use of `old` reads `new`; a graph output keeps its name (the bundle's contract)."""

    new.shape, new.dtype = old.shape, old.dtype
    name, is_output = old.name, old.is_graph_output()
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if is_output:
        old.name = f"{name}.unused"
        new.name = name


REWRITES = (
    attend_to_shared_kv_heads,
    attend_on_packed_heads,
    skip_rms_norms,
    unfuse_skip_layer_norms,
    add_lora_deltas_in_one_node,
)
"""In order: the packed-heads match expects K/V heads no longer repeated."""
