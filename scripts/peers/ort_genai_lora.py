"""Turn the LoRA side branches that onnxruntime-genai's model builder bakes into a graph into
graph inputs, and write their values as an `.onnx_adapter` file (onnxruntime.AdapterFormat).

Why: the builder's `adapter_path` option freezes the LoRA into the model as initializers (and
at int4 quantizes them with the base). A runtime adapter, which onnxruntime-genai loads with
`og.Adapters` and activates per generator, needs each LoRA weight to be a graph input instead.
Every node of the builder's LoRA branches (`.../lora_A/...`, `.../lora_B/...`) becomes a plain
fp32 MatMul whose weight input is named after the fp32 build's initializer; the values come
from that fp32 build (already transposed for MatMul, B already scaled by alpha / r), so the
fp32 and int4 models share one adapter file.

    python ort_genai_lora.py extract FP32_DIR ADAPTER_FILE   # before FP32_DIR is rewritten
    python ort_genai_lora.py rewrite MODEL_DIR ADAPTER_FILE   # in place, fp32 or int4 build
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def lora_weight_name(node: onnx.NodeProto) -> str | None:
    """`/model/layers.0/attn/q_proj/lora_A/MatMul` -> `model.layers.0.attn.q_proj.lora_A.
    MatMul.weight` (the builder's fp32 initializer name); None for other nodes."""
    parts = node.name.strip("/").split("/")
    if len(parts) < 2 or parts[-2] not in ("lora_A", "lora_B"):
        return None
    return ".".join([*parts[:-1], "MatMul", "weight"])


def fp32_lora_weights(fp32_dir: Path) -> dict[str, np.ndarray]:
    model = onnx.load(fp32_dir / "model.onnx")
    inits = {init.name: init for init in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        name = lora_weight_name(node)
        if name is not None and node.op_type == "MatMul" and node.input[1] in inits:
            weights[name] = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if not weights:
        raise SystemExit(f"no LoRA MatMul nodes in {fp32_dir}: was it built with adapter_path?")
    return weights


def rewrite(model_dir: Path, weights: dict[str, np.ndarray]) -> int:
    path = model_dir / "model.onnx"
    model = onnx.load(path)
    graph = model.graph
    replaced = 0
    nodes = []
    for node in graph.node:
        name = lora_weight_name(node)
        if name is None:
            nodes.append(node)
            continue
        if name not in weights:
            raise SystemExit(f"{node.name} has no fp32 counterpart {name}")
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [node.output[0]], node.name))
        graph.input.append(
            helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, weights[name].shape)
        )
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    data = model_dir / "model.onnx.data"
    data.unlink(missing_ok=True)
    onnx.save(model, path, save_as_external_data=True, location=data.name)
    return replaced


def write_adapter(weights: dict[str, np.ndarray], out: Path) -> None:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(
        {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w))
            for name, w in weights.items()
        }
    )
    adapter.export_adapter(str(out))


def read_adapter(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    parameters = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    return {name: value.numpy() for name, value in parameters.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["extract", "rewrite"])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("adapter_file", type=Path)
    args = parser.parse_args()
    if args.action == "extract":
        weights = fp32_lora_weights(args.model_dir)
        write_adapter(weights, args.adapter_file)
        print(f"{args.adapter_file}: {len(weights)} LoRA weights")
    else:
        replaced = rewrite(args.model_dir, read_adapter(args.adapter_file))
        print(f"{args.model_dir}: {replaced} LoRA nodes now read graph inputs")


if __name__ == "__main__":
    main()
