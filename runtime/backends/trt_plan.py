"""GPU-free decisions of the TensorRT backend: which engine, which profile, do shapes fit.

Kept apart from trt.py so that they are tested on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from peft_export.bundle.manifest import EngineRecord, GraphSpec, Manifest
from peft_export.runtime.errors import InferenceError

PREFILL, DECODE = 0, 1
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def select_engine(
    manifest: Manifest, installed: Mapping[str, str], gpu: str | None, file: str | None = None
) -> EngineRecord:
    """The first engine that this TensorRT (name -> version) can run on this GPU."""
    if not manifest.engines:
        raise InferenceError(
            "the bundle has no TensorRT engine; run 'peft-export build-engine BUNDLE' first, "
            "or use backend 'ort'"
        )
    reasons = []
    for record in manifest.engines:
        if file is not None and record.file != file:
            continue
        why = engine_misfit(record, installed, gpu)
        if why is None:
            return record
        reasons.append(f"{record.file}: {why}")
    if not reasons:
        raise InferenceError(f"the bundle has no engine {file!r}; see manifest.json 'engines'")
    raise InferenceError(
        f"no engine of the bundle runs here ({'; '.join(reasons)}); rebuild with "
        "'peft-export build-engine BUNDLE' on this machine"
    )


def engine_misfit(
    record: EngineRecord, installed: Mapping[str, str], gpu: str | None
) -> str | None:
    version = installed.get(record.backend)
    if version is None:
        return f"built with {record.backend}, which is not installed"
    if version != record.version:
        return f"built with {record.backend} {record.version}, installed is {version}"
    if gpu is None:
        return "no CUDA GPU is visible"
    if record.compute_capability and gpu not in record.compute_capability.split(","):
        return f"built for sm {record.compute_capability}, this GPU is {gpu}"
    return None


def step_dims(graph: GraphSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Values of the named dimensions in one step's input shapes (plain names only)."""
    dims: dict[str, int] = {}
    for spec in graph.inputs:
        shape = shapes.get(spec.name)
        if shape is None:
            continue
        for dim, value in zip(spec.shape, shape, strict=False):
            named = isinstance(dim, str) and "+" not in dim
            if named and dims.setdefault(dim, value) != value:
                raise InferenceError(
                    f"dimension {dim!r} is {dims[dim]} in one input and {value} in "
                    f"{spec.name!r}; the step's inputs disagree"
                )
    return dims


def choose_profile(record: EngineRecord, dims: Mapping[str, int]) -> int:
    """Decode (1) for one token per row when it fits, else prefill (0); refuse misfits."""
    candidates = [DECODE, PREFILL] if dims.get("seq") == 1 else [PREFILL]
    problems = []
    for index in candidates:
        if index >= len(record.profiles):
            continue
        problem = _misfit(record.profiles[index], dims)
        if problem is None:
            return index
        problems.append(problem)
    raise InferenceError(
        f"the request does not fit the engine's profiles ({problems[0]}); rebuild the engine "
        "with wider --batch/--seq/--past"
    )


def numpy_dtype(name: str) -> np.dtype:
    if name not in _NP:
        raise InferenceError(f"tensor type {name} is not served by the TensorRT backend")
    return np.dtype(_NP[name])


def _misfit(profile: Mapping[str, list[int]], dims: Mapping[str, int]) -> str | None:
    for name, (low, _, high) in profile.items():
        value = dims.get(name)
        if value is not None and not low <= value <= high:
            return f"{name} {value} is outside {low}..{high}"
    return None
