"""The one place that knows TensorRT from TensorRT-RTX.

Both expose TensorRT's Python API; they differ in the import name, in how the target GPU is
chosen (RTX builds ahead of time for named compute capabilities, TensorRT for the GPU it
runs on) and in plugin support. Everything else in the engine builder is shared.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from peft_export.exporter.errors import ExportError

TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt_rtx"
BACKEND_CHOICES = ("tensorrt", "tensorrt-rtx")


@dataclass(frozen=True)
class TrtBackend:
    name: str
    module: ModuleType

    @property
    def version(self) -> str:
        return str(self.module.__version__)

    @property
    def is_rtx(self) -> bool:
        return self.name == TENSORRT_RTX

    @property
    def supports_plugins(self) -> bool:
        """TensorRT-RTX has no add_plugin_v3, so the multi-LoRA plugin cannot be used there."""
        return not self.is_rtx

    def compute_capabilities(self, requested: list[str]) -> list[str]:
        """Targets of the build: RTX builds for the named ones; TensorRT for the local GPU."""
        if not self.is_rtx:
            if requested:
                raise ExportError(
                    "--compute-capability applies to TensorRT-RTX only; full TensorRT builds "
                    "for the GPU it runs on: drop the option or pass --trt-backend tensorrt-rtx"
                )
            return []
        targets = requested or ["8.6"]
        for cc in targets:
            if not hasattr(self.module.ComputeCapability, capability_enum_name(cc)):
                known = [
                    f"{m[2:-1]}.{m[-1]}"
                    for m in self.module.ComputeCapability.__members__
                    if m.startswith("SM")
                ]
                raise ExportError(
                    f"TensorRT-RTX {self.version} cannot target compute capability {cc}; "
                    f"choose from {', '.join(known)}"
                )
        return targets

    def set_compute_capabilities(self, config: Any, targets: list[str]) -> None:
        if not self.is_rtx:
            return
        config.num_compute_capabilities = len(targets)
        for index, cc in enumerate(targets):
            config.set_compute_capability(
                getattr(self.module.ComputeCapability, capability_enum_name(cc)), index
            )

    def polygraphy_config_class(self) -> Any:
        if self.is_rtx:
            from polygraphy.backend.tensorrt_rtx.config import CreateConfigRTX

            return CreateConfigRTX
        from polygraphy.backend.trt import CreateConfig

        return CreateConfig


def capability_enum_name(cc: str) -> str:
    """'8.6' -> 'SM86' (the ComputeCapability member of TensorRT-RTX)."""
    major, dot, minor = cc.partition(".")
    if not (major.isdigit() and dot and minor.isdigit()):
        raise ExportError(f"compute capability {cc!r} must look like 8.6; fix --compute-capability")
    return f"SM{major}{minor}"


def select_backend(requested: str | None = None) -> TrtBackend:
    """`tensorrt` when importable, else `tensorrt_rtx`; `requested` forces one."""
    if requested is not None:
        name = requested.replace("-", "_")
        if name not in (TENSORRT, TENSORRT_RTX):
            raise ExportError(
                f"unknown TensorRT backend {requested!r}; use one of {', '.join(BACKEND_CHOICES)}"
            )
        candidates = [name]
    else:
        candidates = [TENSORRT, TENSORRT_RTX]
    for name in candidates:
        module = _import(name)
        if module is not None:
            backend = TrtBackend(name, module)
            _point_polygraphy_at(backend)
            return backend
    wanted = requested or "TensorRT or TensorRT-RTX"
    raise ExportError(
        f"{wanted} is not importable; install it (pip install 'peft-export[trt]' on a machine "
        "with TensorRT, or 'peft-export[trt-rtx]' for TensorRT-RTX)"
    )


def available_backends() -> list[TrtBackend]:
    """Every importable flavour (without binding Polygraphy to one)."""
    modules = [(name, _import(name)) for name in (TENSORRT, TENSORRT_RTX)]
    return [TrtBackend(name, module) for name, module in modules if module is not None]


def _import(name: str) -> ModuleType | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):
        return None


def _point_polygraphy_at(backend: TrtBackend) -> None:
    """Polygraphy binds its TensorRT module when `polygraphy.backend.trt` is first imported."""
    from polygraphy import config

    wanted = backend.is_rtx
    if "polygraphy.backend.trt" in sys.modules and wanted != config.USE_TENSORRT_RTX:
        current = "TensorRT-RTX" if config.USE_TENSORRT_RTX else "TensorRT"
        raise ExportError(
            f"Polygraphy was already set up for {current} in this process; build in a fresh "
            f"process or set POLYGRAPHY_USE_TENSORRT_RTX={int(wanted)}"
        )
    config.USE_TENSORRT_RTX = wanted
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = str(int(wanted))
