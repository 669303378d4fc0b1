"""Inputs whose buffers never move (LoRA banks) held inside an ONNX Runtime CPU session.

Why: every run passes its bound inputs through ONNX Runtime's feed handling, and a runtime
LoRA graph has hundreds of bank inputs (SmolLM2 all-linear: 420). Held instead as session
initializers that point at the same host buffers, a decode step no longer passes them,
which measured ~3-5% of a SmolLM2 decode step here (docs/known-issues.md). Writes into the
buffers (slot swaps) are seen by the next run, as with bound inputs.

How: the graph's bytes get extra initializers with the banks' names whose data is "external"
in virtual files, one per bank; `add_external_initializers_from_files_in_memory` maps each
virtual file to the bank's memory and `session.use_external_initializer_file_buffers_directly`
makes ONNX Runtime borrow that memory instead of copying it. The banks stay graph inputs too,
so ONNX Runtime treats them as overridable initializers and never folds them into constants.
Versions without the borrowing option copy silently; `borrows_buffers` finds that out once
per process with a probe graph, and the backend then binds the banks every run as before.
So does a graph whose weights are in external data files (bundles over 2 GB): ONNX Runtime
would look for those among the in-memory files as well.

The few protobuf fields this needs are written here by hand: the runtime does not depend on
the `onnx` package, and concatenated protobuf messages merge (repeated fields append).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

BORROW_CONFIG = "session.use_external_initializer_file_buffers_directly"
_SUFFIX = ".held"

_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}
"""TensorProto.DataType of the dtypes banks come in (fp32 and fp16 bundles)."""


def can_hold(array: np.ndarray) -> bool:
    return array.dtype in _ONNX_TYPES and array.flags.c_contiguous and array.size > 0


def hold(session_options: Any, graph_path: Path, held: Mapping[str, np.ndarray]) -> bytes | None:
    """The graph's bytes with `held` as borrowed initializers, their memory registered with
    `session_options` (keep the arrays alive as long as the session); None for a graph whose
    weights are in external data files (over 2 GB), which ONNX Runtime would then look for
    among the in-memory files too."""
    graph = graph_path.read_bytes()
    if _has_external_data(graph):
        return None
    _lend(session_options, held)
    extra = b"".join(_field(5, _external_tensor(name, array)) for name, array in held.items())
    return graph + _field(7, extra)


@functools.cache
def borrows_buffers() -> bool:
    """Whether this onnxruntime uses held buffers in place (a write after loading is seen)."""
    import onnxruntime as ort

    weights = np.ones(32, dtype=np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    _lend(options, {"w": weights})
    try:
        model = _probe_model(weights)
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        weights[:] = 2.0
        (out,) = session.run(None, {"x": np.zeros(32, dtype=np.float32)})
    except Exception:  # ORT raises private exception types; any failure means "do not hold"
        return False
    return bool(np.all(out == 2.0))


def _has_external_data(model: bytes) -> bool:
    """Whether any initializer of the ModelProto says data_location EXTERNAL."""
    view = memoryview(model)
    return any(
        number == 14 and value == 1
        for graph in _fields(view, want=7)
        for tensor in _fields(graph, want=5)
        for number, value in _varint_fields(tensor)
    )


def _lend(session_options: Any, held: Mapping[str, np.ndarray]) -> None:
    """Map each held array to its virtual file, to be used in place."""
    session_options.add_session_config_entry(BORROW_CONFIG, "1")
    buffers = [array.reshape(-1).view(np.uint8) for array in held.values()]
    session_options.add_external_initializers_from_files_in_memory(
        [name + _SUFFIX for name in held], buffers, [b.nbytes for b in buffers]
    )


def _probe_model(weights: np.ndarray) -> bytes:
    """y = x + w, with w held: an Add whose second input is a borrowed initializer."""
    node = _field(1, b"x") + _field(1, b"w") + _field(2, b"y") + _field(4, b"Add")
    graph = (
        _field(1, node)
        + _field(2, b"probe")
        + _field(5, _external_tensor("w", weights))
        + b"".join(_field(11, _value_info(n, weights.size)) for n in ("x", "w"))
        + _field(12, _value_info("y", weights.size))
    )
    opset = _field(2, _varint(17), wire=0)
    return _field(1, _varint(8), wire=0) + _field(8, opset) + _field(7, graph)


def _external_tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims, data_type, name, external_data {location}, data_location EXTERNAL."""
    dims = b"".join(_field(1, _varint(d), wire=0) for d in array.shape)
    location = _field(1, b"location") + _field(2, (name + _SUFFIX).encode())
    return (
        dims
        + _field(2, _varint(_ONNX_TYPES[array.dtype]), wire=0)
        + _field(8, name.encode())
        + _field(13, location)
        + _field(14, _varint(1), wire=0)
    )


def _value_info(name: str, size: int) -> bytes:
    """ValueInfoProto of a float tensor [size]."""
    shape = _field(1, _field(1, _varint(size), wire=0))
    tensor_type = _field(1, _varint(1), wire=0) + _field(2, shape)
    return _field(1, name.encode()) + _field(2, _field(1, tensor_type))


def _field(number: int, payload: bytes, *, wire: int = 2) -> bytes:
    """One protobuf field: length-delimited (wire 2) or an already encoded varint (wire 0)."""
    key = _varint(number << 3 | wire)
    return key + (payload if wire == 0 else _varint(len(payload)) + payload)


def _fields(message: memoryview, *, want: int) -> list[memoryview]:
    """The length-delimited fields numbered `want` of one message (others skipped)."""
    found = []
    for number, wire, value, start in _walk(message):
        if wire == 2 and number == want:
            found.append(message[start : start + value])
    return found


def _varint_fields(message: memoryview) -> list[tuple[int, int]]:
    return [(number, value) for number, wire, value, _ in _walk(message) if wire == 0]


def _walk(message: memoryview) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, varint value or payload length, payload start) per field."""
    fields, at = [], 0
    while at < len(message):
        key, at = _read_varint(message, at)
        number, wire = key >> 3, key & 7
        if wire in (0, 2):
            value, at = _read_varint(message, at)
            fields.append((number, wire, value, at))
            at += value if wire == 2 else 0
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return fields


def _read_varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)
