"""The `peft_export::SlotScale` op: per-row DoRA/IA3 scales as one node.

    y[b, t, :] = x[b, t, :] * scale[adapter_ids[b], :]

In standard ops a scale is Gather + Unsqueeze + Mul per module, three nodes whose dispatch
cost at decode time (one token) outweighs the arithmetic: on SmolLM2 they made a decode step
~3-5% slower. One opaque node runs the CPU kernel (plugins/multilora) where it is loaded,
which also skips the rows whose slot has no scales (all ones); the model carries a local
function with the standard-op body, which any other runtime runs.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx import helper

from peft_export.bundle import names

_OPSET = onnxscript.values.Opset(names.MULTILORA_DOMAIN, names.MULTILORA_VERSION)
_INPUTS = ("x", "scale", "adapter_ids")


def _register_schema() -> onnx.defs.OpSchema:
    """onnxscript builds nodes only for ops with a schema; register ours once per process."""
    op, version, domain = names.SLOT_SCALE_OP, names.MULTILORA_VERSION, names.MULTILORA_DOMAIN
    if onnx.defs.has(op, version, domain):
        return onnx.defs.get_schema(op, version, domain)
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        op,
        domain,
        version,
        "Per-row scale: y[b] = x[b] * scale[adapter_ids[b]].",
        inputs=[param("x", "T"), param("scale", "T"), param("adapter_ids", "I")],
        outputs=[param("y", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types"),
            ("I", ["tensor(int64)", "tensor(int32)"], "slot ids"),
        ],
    )
    onnx.defs.register_schema(schema)
    return schema


_SLOT_SCALE = onnxscript.values.Op(_OPSET, names.SLOT_SCALE_OP, _register_schema())


@torch.library.custom_op("peft_export::slot_scale", mutates_args=())
def slot_scale(x: torch.Tensor, scale: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, n] times its row's slot of scale [slots, n]."""
    return x * scale.index_select(0, adapter_ids).unsqueeze(1)


@slot_scale.register_fake
def _slot_scale_fake(
    x: torch.Tensor, scale: torch.Tensor, adapter_ids: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(x)


def _slot_scale_onnx(x, scale, adapter_ids):  # noqa: ANN001, ANN202 - onnxscript tensors
    return _SLOT_SCALE(x, scale, adapter_ids)


TRANSLATION_TABLE = {torch.ops.peft_export.slot_scale.default: _slot_scale_onnx}
"""For torch.onnx.export(dynamo=True, custom_translation_table=...)."""


def function_proto(opset: int) -> onnx.FunctionProto:
    """The reference body: Gather the scales by adapter_ids, Unsqueeze to [batch, 1, n], Mul."""
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["axes"],
            value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [1]),
        ),
        helper.make_node("Gather", ["scale", "adapter_ids"], ["rows"], axis=0),
        helper.make_node("Unsqueeze", ["rows", "axes"], ["row_scale"]),
        helper.make_node("Mul", ["x", "row_scale"], ["y"]),
    ]
    return helper.make_function(
        names.MULTILORA_DOMAIN,
        names.SLOT_SCALE_OP,
        list(_INPUTS),
        ["y"],
        nodes,
        [helper.make_opsetid("", opset)],
    )


def add_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach the local function when the graph uses the op (idempotent)."""
    used = any(
        n.domain == names.MULTILORA_DOMAIN and n.op_type == names.SLOT_SCALE_OP
        for n in model.graph.node
    )
    have = any(
        f.domain == names.MULTILORA_DOMAIN and f.name == names.SLOT_SCALE_OP
        for f in model.functions
    )
    if used and not have:
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        model.functions.append(function_proto(opset))
    return model
