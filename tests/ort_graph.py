"""Run a bundle's model.onnx with onnxruntime directly (test helper, not the runtime package).

Parity tests use this so that a runtime bug cannot hide an exporter bug, and vice versa.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class OrtGraph:
    """A session over `bundle/model.onnx` that keeps the KV cache between calls."""

    def __init__(
        self,
        bundle: str | Path,
        extra_feeds: dict[str, np.ndarray] | None = None,
        custom_ops_library: Path | None = None,
        initializers: dict[str, np.ndarray] | None = None,
    ):
        """`initializers` replace the graph's initializers of those names (other weights)."""
        bundle = Path(bundle)
        self.manifest = json.loads((bundle / "manifest.json").read_text())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if custom_ops_library is not None:
            options.register_custom_ops_library(str(custom_ops_library))
        self._initializers = [
            (name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
            for name, value in (initializers or {}).items()
        ]
        for name, value in self._initializers:
            options.add_initializer(name, value)
        self.session = ort.InferenceSession(
            str(bundle / self.manifest["graph"]["file"]),
            options,
            providers=["CPUExecutionProvider"],
        )
        kv = self.manifest["kv"]
        self.num_layers = kv["num_layers"]
        self.kv_shape = (kv["num_kv_heads"], kv["head_dim"])
        self.dtype = _NP_DTYPES[kv["dtype"]]
        self.extra_feeds = dict(extra_feeds or {})
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.reset(batch=1)

    def reset(self, batch: int) -> None:
        heads, head_dim = self.kv_shape
        empty = np.zeros((batch, heads, 0, head_dim), dtype=self.dtype)
        self.past = [(empty, empty) for _ in range(self.num_layers)]
        self.mask = np.zeros((batch, 0), dtype=np.int64)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Feed new tokens (mask of the new tokens, default ones); return their logits."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        full_mask = np.concatenate([self.mask, attention_mask.astype(np.int64)], axis=1)
        positions = np.clip(np.cumsum(full_mask, axis=1) - 1, 0, None)[:, -input_ids.shape[1] :]
        feeds = {
            "input_ids": input_ids,
            "attention_mask": full_mask,
            "position_ids": positions.astype(np.int64),
            **self.extra_feeds,
        }
        for i, (key, value) in enumerate(self.past):
            feeds[f"past_key_values.{i}.key"] = key
            feeds[f"past_key_values.{i}.value"] = value
        outputs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        self.past = [
            (outputs[f"present.{i}.key"], outputs[f"present.{i}.value"])
            for i in range(self.num_layers)
        ]
        self.mask = full_mask
        return outputs["logits"]

    def greedy(self, input_ids: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy continuation of a [batch, seq] prompt through the KV cache."""
        self.reset(batch=input_ids.shape[0])
        logits = self.step(input_ids)
        out = []
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1)[:, None]
            out.append(token)
            logits = self.step(token)
        return np.concatenate(out, axis=1)
