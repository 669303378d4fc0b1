"""`verify --engine trt`: can this machine execute the bundle's engine at all?

Engines are verified on the machine that will run them. Without TensorRT, a GPU, or an
engine built for this GPU, verification stops here with the reason and the fix instead of
failing deep inside the runtime.
"""

from __future__ import annotations

from pathlib import Path

from peft_export.bundle.manifest import EngineRecord, load_manifest
from peft_export.exporter.engines.gpu import gpu_compute_capability
from peft_export.exporter.engines.trt_backend import available_backends
from peft_export.exporter.errors import ExportError


def require_trt_execution(bundle: str | Path) -> EngineRecord:
    """The engine record that can run here; ExportError saying why none can."""
    manifest = load_manifest(bundle)
    if not manifest.engines:
        raise ExportError(
            f"{bundle} has no TensorRT engine; build one with 'peft-export build-engine {bundle}'"
        )
    gpu = gpu_compute_capability()
    if gpu is None:
        raise ExportError(
            "verify --engine trt needs an NVIDIA GPU and none is visible here; the engine "
            "build itself was checked when it was built: run verify on the GPU machine"
        )
    installed = {backend.name: backend for backend in available_backends()}
    for record in manifest.engines:
        backend = installed.get(record.backend)
        if backend is None or backend.version != record.version:
            continue
        if record.compute_capability and gpu not in record.compute_capability.split(","):
            continue
        return record
    built = ", ".join(
        f"{e.file} ({e.backend} {e.version}, sm {e.compute_capability})" for e in manifest.engines
    )
    have = ", ".join(f"{b.name} {b.version}" for b in installed.values()) or "no TensorRT"
    raise ExportError(
        f"no engine of {bundle} runs here (GPU {gpu}, {have}); engines: {built}. Rebuild with "
        f"'peft-export build-engine {bundle}' on this machine"
    )
