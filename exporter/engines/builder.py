"""ONNX -> serialized engine through Polygraphy's TensorRT loaders.

The network is always strongly typed: the ONNX was exported in the bundle's precision and
TensorRT keeps every tensor's type as the graph says, so fp32/fp16/bf16 need no builder
flags. Refittable engines mark only the named weights (REFIT_INDIVIDUAL), so an adapter swap
refits exactly the projections an adapter can touch and the rest stays constant-folded.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft_export.bundle.manifest import GraphSpec
from peft_export.exporter.engines.gpu import gpu_compute_capability
from peft_export.exporter.engines.profiles import Profile, input_shapes
from peft_export.exporter.engines.progress import build_progress
from peft_export.exporter.engines.trt_backend import TrtBackend
from peft_export.exporter.errors import ExportError


@dataclass(frozen=True)
class BuildPlan:
    """Everything one engine build depends on (and the cache key covers)."""

    graph: GraphSpec
    profiles: list[Profile]
    compute_capabilities: list[str] = field(default_factory=list)
    refit_weights: list[str] = field(default_factory=list)
    lora_plugin: bool = False


def build_engine_bytes(
    backend: TrtBackend, onnx_path: Path, plan: BuildPlan, *, title: str, progress: bool = True
) -> bytes:
    """Parse, configure and build; every failure becomes an ExportError naming the fix."""
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    if plan.lora_plugin:
        _load_lora_plugin(backend)
    with build_progress(backend.module, title, progress) as monitor, _polygraphy_quiet():
        try:
            engine = EngineBytesFromNetwork(
                lambda: _parse(backend, onnx_path, plan),
                config=lambda builder, network: _config(backend, plan, monitor, builder, network),
            )()
        except PolygraphyException as exc:
            raise ExportError(_explain_failure(backend, plan, exc)) from None
    return bytes(engine)


def create_network_and_config(
    backend: TrtBackend, onnx_path: Path, plan: BuildPlan
) -> tuple[Any, Any, Any, Any]:
    """(builder, network, parser, config) exactly as a build would use them, without building."""
    builder, network, parser = _parse(backend, onnx_path, plan)
    config = _config(backend, plan, None, builder, network)
    return builder, network, parser, config


def _parse(backend: TrtBackend, onnx_path: Path, plan: BuildPlan) -> tuple[Any, Any, Any]:
    from polygraphy.backend.trt import NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    try:
        builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    except PolygraphyException as exc:
        raise ExportError(
            f"{backend.name} {backend.version} cannot parse {onnx_path.name} ({exc}); "
            "the graph uses an operation this TensorRT lacks: try a newer TensorRT or report it"
        ) from None
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    declared = {spec.name for spec in plan.graph.inputs}
    if network_inputs != declared:
        raise ExportError(
            f"{onnx_path.name} inputs {sorted(network_inputs ^ declared)} disagree with "
            "manifest.json; the bundle is inconsistent: re-export it"
        )
    for name in plan.refit_weights:
        if not network.mark_weights_refittable(name):
            raise ExportError(
                f"TensorRT cannot mark weight {name!r} refittable; build without --refit "
                "or report this with the model used"
            )
    return builder, network, parser


def _config(backend: TrtBackend, plan: BuildPlan, monitor: Any, builder: Any, network: Any) -> Any:
    from polygraphy.backend.trt import Profile as PolygraphyProfile

    profiles = []
    for profile in plan.profiles:
        shapes = PolygraphyProfile()
        for name, (low, opt, high) in input_shapes(plan.graph, profile).items():
            shapes.add(name, low, opt, high)
        profiles.append(shapes)
    kwargs: dict[str, Any] = {"profiles": profiles, "progress_monitor": monitor}
    config = backend.polygraphy_config_class()(**kwargs)(builder, network)
    backend.set_compute_capabilities(config, plan.compute_capabilities)
    if plan.refit_weights:
        config.set_flag(backend.module.BuilderFlag.REFIT_INDIVIDUAL)
    return config


def _explain_failure(backend: TrtBackend, plan: BuildPlan, exc: Exception) -> str:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if plan.refit_weights and backend.is_rtx and gpu_compute_capability() is None:
        return (
            f"TensorRT-RTX {backend.version} cannot build a refittable engine without a GPU "
            f"({detail}); build with --refit on a machine with an NVIDIA GPU, or drop --refit"
        )
    return (
        f"{backend.name} {backend.version} failed to build the engine ({detail}); see the "
        "TensorRT log above, narrow --batch/--seq/--past, or report it with the bundle"
    )


def _load_lora_plugin(backend: TrtBackend) -> None:
    if not backend.supports_plugins:
        raise ExportError(
            "TensorRT-RTX cannot load the multi-LoRA plugin (no IPluginV3 support); "
            "use --lora-impl onnx, or full TensorRT with --trt-backend tensorrt"
        )
    plugins = importlib.import_module("peft_export.plugins")
    loader = getattr(plugins, "load_trt_plugin", None)
    if loader is None:
        raise ExportError(
            "this peft-export has no multi-LoRA TensorRT plugin loader; use --lora-impl onnx"
        )
    loader(backend.module)


@contextlib.contextmanager
def _polygraphy_quiet() -> Iterator[None]:
    """Polygraphy logs a config table per build; the CLI shows its own progress instead."""
    from polygraphy.logger import G_LOGGER

    previous = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.WARNING
    try:
        yield
    finally:
        G_LOGGER.module_severity = previous
