"""The `peft_export::MultiLoRA` op: torch custom op, its ONNX node and its ONNX function body.

Tracing sees one opaque op per target module, so the exported graph holds one
`peft_export.MultiLoRA` node (what the TensorRT plugin replaces) instead of a Gather/MatMul
pattern that would have to be found again. The model also carries a local function of the same
name whose body is the reference in standard ops, so any runtime without the plugin runs it.
`MultiLoRAAdd{n}`'s function (ONNX Runtime-fused graphs, exporter/graph/ort_rewrites.py) is
here too: its body calls MultiLoRA's.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx import helper

from peft_export.bundle import names

_CUSTOM_OPSET = onnxscript.values.Opset(names.MULTILORA_DOMAIN, names.MULTILORA_VERSION)


def _register_schema() -> onnx.defs.OpSchema:
    """onnxscript builds nodes only for ops with a schema; register ours once per process."""
    if onnx.defs.has(names.MULTILORA_OP, names.MULTILORA_VERSION, names.MULTILORA_DOMAIN):
        return onnx.defs.get_schema(
            names.MULTILORA_OP, names.MULTILORA_VERSION, names.MULTILORA_DOMAIN
        )
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        names.MULTILORA_OP,
        names.MULTILORA_DOMAIN,
        names.MULTILORA_VERSION,
        "Per-row LoRA delta: delta[b] = x[b] @ A[ids[b]]^T @ B[ids[b]]^T.",
        inputs=[param("x", "T"), param("A", "T"), param("B", "T"), param("adapter_ids", "I")],
        outputs=[param("delta", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types"),
            ("I", ["tensor(int64)", "tensor(int32)"], "slot ids"),
        ],
    )
    onnx.defs.register_schema(schema)
    return schema


_MULTILORA = onnxscript.values.Op(_CUSTOM_OPSET, names.MULTILORA_OP, _register_schema())
_INPUTS = ("x", "A", "B", "adapter_ids")
_OUTPUT = "delta"


@torch.library.custom_op("peft_export::multi_lora", mutates_args=())
def multi_lora(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, adapter_ids: torch.Tensor
) -> torch.Tensor:
    """delta[b, t] = B[ids[b]] @ (A[ids[b]] @ x[b, t]); x [batch, seq, in]."""
    a_rows = a.index_select(0, adapter_ids)
    b_rows = b.index_select(0, adapter_ids)
    return torch.bmm(torch.bmm(x, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))


@multi_lora.register_fake
def _multi_lora_fake(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, adapter_ids: torch.Tensor
) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], b.shape[1]))


def _multi_lora_onnx(x, a, b, adapter_ids):  # noqa: ANN001, ANN202 - onnxscript tensors
    return _MULTILORA(x, a, b, adapter_ids)


TRANSLATION_TABLE = {torch.ops.peft_export.multi_lora.default: _multi_lora_onnx}
"""For torch.onnx.export(dynamo=True, custom_translation_table=...)."""


def function_proto(opset: int) -> onnx.FunctionProto:
    """The reference body: Gather the banks by adapter_ids, Transpose, two batched MatMuls.

    `opset` must be the model's own (ONNX requires a function to import the same version)."""
    nodes = [
        helper.make_node("Gather", ["A", "adapter_ids"], ["a_rows"], axis=0),
        helper.make_node("Gather", ["B", "adapter_ids"], ["b_rows"], axis=0),
        helper.make_node("Transpose", ["a_rows"], ["a_t"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["b_rows"], ["b_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "a_t"], ["h"]),
        helper.make_node("MatMul", ["h", "b_t"], [_OUTPUT]),
    ]
    return helper.make_function(
        names.MULTILORA_DOMAIN,
        names.MULTILORA_OP,
        list(_INPUTS),
        [_OUTPUT],
        nodes,
        [helper.make_opsetid("", opset)],
    )


def add_function_proto(modules: int, opset: int) -> onnx.FunctionProto:
    """`MultiLoRAAdd{modules}`: y = base + Concat(MultiLoRA(x, A_i, B_i, ids) for each module).

    Inputs (x, adapter_ids, base, A_1, B_1, ..., A_n, B_n): the modules share x, and base is
    their outputs packed along the last axis in the same order (one module: its own output).
    The body calls the MultiLoRA function, which the model must carry too."""
    banks = [name for i in range(1, modules + 1) for name in (f"A{i}", f"B{i}")]
    nodes = [
        helper.make_node(
            names.MULTILORA_OP,
            ["x", f"A{i}", f"B{i}", "adapter_ids"],
            [f"delta{i}"],
            domain=names.MULTILORA_DOMAIN,
        )
        for i in range(1, modules + 1)
    ]
    deltas = [f"delta{i}" for i in range(1, modules + 1)]
    if modules > 1:
        nodes.append(helper.make_node("Concat", deltas, ["delta"], axis=-1))
    nodes.append(helper.make_node("Add", ["base", "delta" if modules > 1 else deltas[0]], ["y"]))
    return helper.make_function(
        names.MULTILORA_DOMAIN,
        names.multilora_add_op(modules),
        ["x", "adapter_ids", "base", *banks],
        ["y"],
        nodes,
        [
            helper.make_opsetid("", opset),
            helper.make_opsetid(names.MULTILORA_DOMAIN, names.MULTILORA_VERSION),
        ],
    )


def add_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach the local function and the custom-domain opset import (idempotent)."""
    if not any(
        f.domain == names.MULTILORA_DOMAIN and f.name == names.MULTILORA_OP for f in model.functions
    ):
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        model.functions.append(function_proto(opset))
    if not any(o.domain == names.MULTILORA_DOMAIN for o in model.opset_import):
        model.opset_import.append(
            helper.make_opsetid(names.MULTILORA_DOMAIN, names.MULTILORA_VERSION)
        )
    return model
