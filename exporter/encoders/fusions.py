"""`export --ort-fusions cpu` for encoders: the decoders' fusion pass, applied to the encoder graph.

transformers' `fuse_for_onnxruntime` (exporter/graph/ort_fusions.py) turns a BERT-family layer
into ONNX Runtime's CPU contrib ops: BiasGelu and, where the query, key and value are plain
projections of one input (a merged bundle), one packed `Attention`; the residual norms stay
Add + LayerNormalization (`ort_rewrites.unfuse_skip_layer_norms` says why).
Where a runtime adapter adds a per-row delta to the query or value (LoRA banks selected by
`adapter_ids`), the packed op cannot take it: the adapter's MultiLoRA node feeds one
`MultiHeadAttention` instead (fused_attention.py), so the adapters stay exact. Head banks
and prompt embeddings are outside the layers and untouched. The graph is opset 18 with
contrib ops: ONNX Runtime only (engine builds refuse it, as for decoders).
"""

from __future__ import annotations

from pathlib import Path

from peft_export.bundle.manifest import Manifest
from peft_export.exporter.errors import ExportError


def fuse_encoder_graph(stage: Path, manifest: Manifest, target: str) -> None:
    """Fuse the staged encoder graph for `target` ("cpu"); "none" leaves it portable."""
    if target == "none":
        return
    if target != "cpu":
        raise ExportError(f"unknown --ort-fusions target {target!r}; use cpu or none")
    from peft_export.exporter.encoders.fused_attention import ENCODER_REWRITES
    from peft_export.exporter.graph.ort_fusions import fuse_graph

    fuse_graph(stage, manifest, target, first_rewrites=ENCODER_REWRITES)
