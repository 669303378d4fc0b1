"""The ORT backend's session options: what it changes from ONNX Runtime's defaults, and that
ONNX Runtime honours it (a renamed optimizer would make the entry a silent no-op)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from peft_export.runtime.backends.ort import (
    DISABLED_ON_CPU,
    DISABLED_OPTIMIZERS,
    OrtBackend,
    OrtOptions,
)

WIDTH = 16


def _post_norm_residual() -> bytes:
    """LayerNormalization(x + bias + skip): the post-norm residual ONNX Runtime fuses."""
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(WIDTH).astype(np.float32) for name in "gbc"}
    shape = ["batch", "seq", WIDTH]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "c"], ["t"]),
            helper.make_node("Add", ["t", "skip"], ["u"]),
            helper.make_node("LayerNormalization", ["u", "g", "b"], ["y"], axis=-1),
        ],
        "residual",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [onnx.numpy_helper.from_array(v, n) for n, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model.SerializeToString()


def _optimized_ops(options: ort.SessionOptions, graph: bytes, tmp_path) -> set[str]:
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def test_cpu_sessions_keep_add_and_layer_norm(tmp_path):
    graph = _post_norm_residual()
    backend = OrtBackend(graph, OrtOptions(threads=1))
    options = backend._session_options(ort)
    assert options.get_session_config_entry(DISABLED_OPTIMIZERS) == DISABLED_ON_CPU
    assert "SkipLayerNormalization" not in _optimized_ops(options, graph, tmp_path)
    ort_default = _optimized_ops(ort.SessionOptions(), graph, tmp_path)
    assert "SkipLayerNormalization" in ort_default  # else the entry guards nothing


def test_extra_config_overrides_the_default(tmp_path):
    graph = _post_norm_residual()
    backend = OrtBackend(graph, OrtOptions(threads=1, extra_config={DISABLED_OPTIMIZERS: ""}))
    options = backend._session_options(ort)
    assert options.get_session_config_entry(DISABLED_OPTIMIZERS) == ""
    assert "SkipLayerNormalization" in _optimized_ops(options, graph, tmp_path)
