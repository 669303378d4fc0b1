"""Refit mapping: which ONNX initializer holds each projection weight, in which layout.

The dynamo exporter folds a Linear's transpose into a new initializer with a generated name
(`val_76`, stored [in, out]), so names alone cannot say which weight is which. Every node
it emits carries `pkg.torch.onnx.name_scopes` (the module path and the torch op), which
does. A refit set is then the merged weights of the modules an adapter touches, stored
under those initializer names in the initializer's layout and dtype, ready for a Refitter.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bundle import names
from peft_export.bundle.graph_file import load_graph
from peft_export.bundle.paths import confined
from peft_export.exporter.errors import ExportError

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
REFIT_FORMAT = "peft-export-refit"
_WEIGHT_OPS = ("MatMul", "Gemm")
_TORCH_IN_OUT_OPS = ("addmm", "mm", "matmul")
"""Ops whose weight operand is stored [in, out] in torch too (GPT-2's Conv1D)."""


@dataclasses.dataclass(frozen=True)
class RefitTarget:
    module: str
    initializer: str
    shape: tuple[int, ...]
    dtype: np.dtype
    transposed: bool
    """True when the initializer holds the torch parameter transposed."""


def refit_targets(onnx_path: Path) -> dict[str, RefitTarget]:
    """Projection weights by traced module path (which may carry a wrapper prefix)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    found: dict[str, RefitTarget] = {}
    for node in graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
            continue
        scopes = _name_scopes(node)
        if len(scopes) < 2:
            continue
        module, torch_op = scopes[-2], re.sub(r"_\d+$", "", scopes[-1])
        stored_in_out = node.op_type == "MatMul" or not _attribute(node, "transB", 0)
        name = node.input[1]
        transpose = producers.get(name)
        if name not in initializers and transpose is not None and transpose.op_type == "Transpose":
            perm = _attribute(transpose, "perm", [1, 0])
            if list(perm) == [1, 0] and transpose.input[0] in initializers:
                name, stored_in_out = transpose.input[0], not stored_in_out
        if name not in initializers:
            continue
        tensor = initializers[name]
        if len(tensor.dims) != 2:
            continue
        torch_in_out = torch_op in _TORCH_IN_OUT_OPS
        found[module] = RefitTarget(
            module=module,
            initializer=name,
            shape=tuple(tensor.dims),
            dtype=np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)),
            transposed=stored_in_out != torch_in_out,
        )
    return found


def refittable_initializers(targets: dict[str, RefitTarget]) -> list[str]:
    """Initializers to mark refittable: each owned by exactly one module (tied ones are not)."""
    owners: dict[str, list[str]] = defaultdict(list)
    for target in targets.values():
        owners[target.initializer].append(target.module)
    return sorted(name for name, modules in owners.items() if len(modules) == 1)


def resolve(targets: dict[str, RefitTarget], param: str) -> RefitTarget:
    """The target of an HF parameter name such as `model.layers.0.self_attn.q_proj.weight`."""
    module = param.removesuffix(".weight")
    matches = [t for key, t in targets.items() if key == module or key.endswith("." + module)]
    if len(matches) != 1:
        reason = "is not a projection of the graph" if not matches else "is ambiguous"
        raise ExportError(
            f"refit: {param!r} {reason}; merged adapters for TensorRT refit may only change "
            "Linear weights: re-export the bundle with this adapter merged instead"
        )
    shared = [t.module for t in targets.values() if t.initializer == matches[0].initializer]
    if len(shared) > 1:
        raise ExportError(
            f"refit: {param!r} shares its graph weight with {', '.join(shared)} (tied or "
            "identical weights); re-export the bundle with this adapter merged instead"
        )
    return matches[0]


def refit_tensors(
    targets: dict[str, RefitTarget], weights: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Torch-layout weights by HF parameter name -> initializer-layout arrays by name."""
    out: dict[str, np.ndarray] = {}
    for param, value in weights.items():
        target = resolve(targets, param)
        array = np.asarray(value)
        array = array.T if target.transposed else array
        if tuple(array.shape) != target.shape:
            raise ExportError(
                f"refit: {param!r} has shape {tuple(value.shape)}, the graph's weight "
                f"{target.initializer!r} is {target.shape}; is this the bundle's base model?"
            )
        if target.dtype == np.dtype("uint16"):
            raise ExportError("refit of bf16 engines is not supported; export fp16 or fp32")
        out[target.initializer] = np.ascontiguousarray(array, dtype=target.dtype)
    return out


def _name_scopes(node: Any) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [s for s in scopes if isinstance(s, str) and s]
    return []


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def write_refit_set(
    bundle_dir: Path,
    name: str,
    base_weights: dict[str, np.ndarray],
    merged_weights: dict[str, np.ndarray],
    *,
    metadata: dict[str, str] | None = None,
    export_name: str | None = None,
) -> list[str]:
    """Write engines/refit/NAME.safetensors for `adapters add` on a merged TRT bundle.

    Weights are torch-layout arrays by HF parameter name; only those the adapter changes are
    stored. engines/refit/base.safetensors keeps the base value of every weight any refit
    set (or the export-time merge) changes, so the runtime can undo the previous adapter.
    `export_name`: also write that set with the graph's own (export-time merged) values of
    those weights, so a refitted engine can return to them (nothing when they equal the base).
    Returns the initializer names of the new set.
    """
    from safetensors.numpy import load_file, save_file

    from peft_export.bundle.atomic import staged_file
    from peft_export.bundle.manifest import load_manifest
    from peft_export.bundle.paths import confined

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    targets = refit_targets(confined(bundle_dir, manifest.graph.file))
    touched = {
        param: value
        for param, value in merged_weights.items()
        if not np.array_equal(value, base_weights[param])
    }
    new_set = refit_tensors(targets, touched)
    base_path = confined(bundle_dir, names.refit_file(names.REFIT_BASE))
    base_set = load_file(str(base_path)) if base_path.is_file() else {}
    base_set.update(refit_tensors(targets, {p: base_weights[p] for p in touched}))
    export_base, exported = _export_merge_diff(
        bundle_dir, manifest.graph.file, targets, base_weights
    )
    base_set.update(export_base)
    info = {"format": REFIT_FORMAT, "version": "1", **(metadata or {})}
    sets = [(names.REFIT_BASE, base_set, info), (name, new_set, info)]
    if export_name and exported:
        sets.append((export_name, exported, {"format": REFIT_FORMAT, "version": "1"}))
    for file_name, tensors, file_info in sets:
        with staged_file(confined(bundle_dir, names.refit_file(file_name))) as tmp:
            save_file(tensors, str(tmp), metadata={**file_info, "name": file_name})
    return sorted(new_set)


def _export_merge_diff(
    bundle_dir: Path, graph_file: str, targets: dict[str, RefitTarget], base: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Base and graph values of the weights where the graph's own weights differ from the base."""
    from onnx import numpy_helper

    model = load_graph(confined(bundle_dir, graph_file))
    stored = {t.name: t for t in model.graph.initializer}
    base_values, graph_values = {}, {}
    for param, value in base.items():
        try:
            target = resolve(targets, param)
        except ExportError:
            continue
        want = refit_tensors({target.module: target}, {target.module + ".weight": value})
        current = numpy_helper.to_array(stored[target.initializer])
        if not np.array_equal(current, want[target.initializer]):
            base_values.update(want)
            graph_values[target.initializer] = np.ascontiguousarray(current)
    return base_values, graph_values
