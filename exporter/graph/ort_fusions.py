"""`--ort-fusions cpu`: a graph for ONNX Runtime alone, traced at opset 23 and then fused.

The portable graph (opset 18, standard ops) is what TensorRT and any ONNX runtime take. On a
CPU, ONNX Runtime runs faster when norms, rotary embeddings and attention are single kernels:
opset 23 has them as standard ops (RMSNormalization, RotaryEmbedding, Attention), and
transformers' exporter ships the rewrite into ONNX Runtime's own fused ops
(`fuse_for_onnxruntime`, built on onnxscript's ORT fusions), which the bundle reuses. Three
rewrites of our own follow, for what our decoder graph (cache as inputs, left-padded batches)
leaves unfused: attention on shared K/V heads, attention on packed heads with the past, and
skip + RMS norm. Engine builds refuse such a bundle. Inputs, outputs and numerics stay those
of the portable graph (`verify` checks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from peft_export.bundle import names
from peft_export.bundle.manifest import Manifest
from peft_export.exporter.errors import ExportError

CHOICES = ("none", "cpu")
ORT_OPSET = 23


def graph_opset(options: dict[str, Any]) -> int:
    """The opset to trace at: 23 for an ONNX Runtime-only graph, else the portable default."""
    from peft_export.exporter.graph.onnx_export import OPSET

    return ORT_OPSET if options.get("ort_fusions", "none") != "none" else OPSET


def ort_fusion_options(command: Any) -> Any:
    """export.py OPTIONS entry: --ort-fusions, refused with --engine trt before any work."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ort_fusions", "none") != "none" and kwargs.get("engine") == "trt":
            raise ExportError(
                "--ort-fusions makes an ONNX Runtime-only graph, which TensorRT cannot build; "
                "drop --ort-fusions for --engine trt (or export two bundles)"
            )
        return command(*args, **kwargs)

    return click.option(
        "--ort-fusions",
        type=click.Choice(CHOICES),
        default="none",
        show_default=True,
        help="Fuse the graph into ONNX Runtime's CPU contrib ops (faster on ONNX Runtime; "
        "TensorRT cannot build it).",
    )(checked)


def ort_fusion_step(stage: Path, manifest: Manifest, context: Any) -> None:
    """export.py POST_STEPS entry: fuse the staged graph when --ort-fusions cpu was given."""
    target = dict(context.options).get("ort_fusions", "none")
    if target != "none":
        fuse_graph(stage, manifest, target)


def fuse_graph(
    bundle_dir: Path,
    manifest: Manifest,
    target: str = "cpu",
    first_rewrites: Sequence[Callable[[Any], None]] = (),
) -> None:
    """Rewrite `manifest.graph.file` in place (weights stay where they were) and record it.

    `first_rewrites` (a model kind's own, e.g. the encoders') run before the shared ones."""
    import onnx_ir as ir

    from peft_export.exporter.graph import ort_rewrites
    from peft_export.exporter.graph.onnx_export import EXTERNAL_DATA_THRESHOLD

    try:
        from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"--ort-fusions needs transformers' ONNX exporter ({exc}); install transformers>=5.23 "
            "or drop --ort-fusions"
        ) from None
    path = Path(bundle_dir) / manifest.graph.file
    model = ir.load(str(path))
    ours = _detach_functions(model, names.MULTILORA_DOMAIN)
    try:
        fuse_for_onnxruntime(model, target)
        for rewrite in (*first_rewrites, *ort_rewrites.REWRITES):
            rewrite(model)
        model.functions.update(ours)
    except Exception as exc:  # noqa: BLE001 - a third-party rewrite; its failure is one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(
            f"ONNX Runtime fusions failed on this graph ({type(exc).__name__}: {first:.200}); "
            "drop --ort-fusions"
        ) from exc
    data = path.with_name(path.name + ".data")
    external = data.is_file() or _nbytes(model) > EXTERNAL_DATA_THRESHOLD
    tmp = path.with_name(path.name + ".fused")
    ir.save(model, str(tmp), external_data=tmp.name + ".data" if external else None)
    data.unlink(missing_ok=True)
    if external:
        tmp.with_name(tmp.name + ".data").rename(data)
        _point_external_data(tmp, data.name)
    tmp.replace(path)
    manifest.graph.ort_fusions = target


def _detach_functions(model: Any, domain: str) -> dict[Any, Any]:
    """Take `domain`'s local functions out of `model`, to be put back after fusing.

    The fusion pass inlines every local function it finds. Inlined, each MultiLoRA node
    becomes Gather + MatMul ops that copy a whole slot of the bank per step, and ONNX
    Runtime can no longer pick the op's CPU kernel: SmolLM2 runtime-LoRA decode steps were
    ~5% slower. Without its function a node is an opaque custom op that the pass leaves as is.
    """
    detached = {key: f for key, f in model.functions.items() if f.domain == domain}
    for key in detached:
        del model.functions[key]
    return detached


def _nbytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def _point_external_data(graph: Path, location: str) -> None:
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(graph))
