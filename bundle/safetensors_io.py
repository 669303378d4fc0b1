"""Header-checked safetensors reading with numpy only (no torch, never pickle).

The header is parsed and every tensor's dtype, shape and byte range is checked before any
tensor memory is allocated, so a hostile or truncated file fails with BundleError instead
of a crash or a huge allocation.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from peft_export.bundle.errors import BundleError
from peft_export.bundle.json_limits import load_json

MAX_HEADER_BYTES = 100 * 1024 * 1024
_FIX = "the file is corrupt or not safetensors; re-create it"
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(path: str | Path, *, max_total_bytes: int | None = None) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file."""
    with SafetensorsReader(path, max_total_bytes=max_total_bytes) as reader:
        return reader.header


class SafetensorsReader:
    """One open safetensors file: its header and its tensor bytes come from the same file
    descriptor. A file replaced by rename between the two reads (`adapters add --replace`)
    therefore never pairs one file's offsets with another file's bytes."""

    def __init__(self, path: str | Path, *, max_total_bytes: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"{self.path}: file not found; check the path, or re-create the file")
        self._fh = open(self.path, "rb")  # noqa: SIM115 - closed by close() / the with block
        try:
            self._size = os.fstat(self._fh.fileno()).st_size
            self.header, self._head = _parse_header(
                self._fh, self.path, self._size, max_total_bytes
            )
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def read_all(
        self, allocate: Callable[[int], np.ndarray] | None = None
    ) -> tuple[dict[str, np.ndarray], str]:
        """Every tensor (views of one block: `allocate(nbytes) -> uint8 array`, else numpy)
        and the sha256 of every byte of the file as read, to compare with a recorded hash."""
        size = self._size - self.header.data_start
        block = np.empty(size, dtype=np.uint8) if allocate is None else allocate(size)
        self._fh.seek(self.header.data_start)
        if self._fh.readinto(memoryview(block)[:size]) != size:
            raise BundleError(f"{self.path}: tensor data is truncated; {_FIX}")
        digest = hashlib.sha256(self._head)
        digest.update(memoryview(block)[:size])
        return _views(block, self.header), digest.hexdigest()


def _parse_header(
    fh: BinaryIO, path: Path, size: int, max_total_bytes: int | None
) -> tuple[SafetensorsHeader, bytes]:
    """The validated header read from `fh` (at offset 0), and its raw bytes (for the hash)."""
    prefix = fh.read(8)
    if len(prefix) < 8:
        raise BundleError(f"{path}: truncated safetensors file (no header); re-create it")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise BundleError(f"{path}: safetensors header length {header_len} is invalid; {_FIX}")
    raw = fh.read(header_len)
    if len(raw) != header_len:
        raise BundleError(f"{path}: truncated safetensors header; {_FIX}")
    header = load_json(raw, where=f"{path}: safetensors header", fix=_FIX)
    if not isinstance(header, dict):
        raise BundleError(f"{path}: safetensors header is not an object; {_FIX}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BundleError(f"{path}: safetensors __metadata__ must map strings to strings; {_FIX}")
    data_start = 8 + header_len
    data_len = size - data_start
    if max_total_bytes is not None and data_len > max_total_bytes:
        raise BundleError(f"{path}: {data_len} bytes of tensors exceed the {max_total_bytes} limit")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        info = _tensor_info(path, name, entry, data_len)
        tensors[name] = info
        spans.append((info.begin, info.end, name))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise BundleError(f"{path}: tensors {name_a!r} and {name_b!r} overlap; {_FIX}")
    return SafetensorsHeader(tensors, dict(metadata), data_start), prefix + raw


def _tensor_info(path: Path, name: str, entry: object, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise BundleError(f"{path}: tensor {name!r} has a malformed header entry; {_FIX}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BundleError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; {_FIX}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
    ):
        raise BundleError(f"{path}: tensor {name!r} has an invalid shape {shape!r:.60}; {_FIX}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise BundleError(f"{path}: tensor {name!r} points outside the file (truncated?); {_FIX}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise BundleError(
            f"{path}: tensor {name!r} byte size does not match dtype and shape; {_FIX}"
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def read_tensors(
    path: str | Path,
    header: SafetensorsHeader | None = None,
    *,
    allocate: Callable[[int], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Read every tensor of a validated file into numpy (BF16 comes back as raw uint16).

    With `allocate(nbytes) -> uint8 array`, the tensor bytes are read into that one block
    and the tensors are views of it (the runtime's adapter store puts it on huge pages).
    Without `header`, header and bytes come from one open file (SafetensorsReader); a header
    read earlier is only safe for a file nothing replaces in between."""
    path = Path(path)
    if header is None:
        with SafetensorsReader(path) as reader:
            return reader.read_all(allocate)[0]
    if allocate is not None:
        return _read_into_block(path, header, allocate)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as fh:
        for name, info in header.tensors.items():
            fh.seek(header.data_start + info.begin)
            buf = fh.read(info.end - info.begin)
            if len(buf) != info.end - info.begin:
                raise BundleError(f"{path}: tensor {name!r} is truncated; {_FIX}")
            out[name] = np.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape).copy()
    return out


def _read_into_block(
    path: Path, header: SafetensorsHeader, allocate: Callable[[int], np.ndarray]
) -> dict[str, np.ndarray]:
    size = max((info.end for info in header.tensors.values()), default=0)
    block = allocate(size)
    with open(path, "rb") as fh:
        fh.seek(header.data_start)
        if fh.readinto(memoryview(block)[:size]) != size:
            raise BundleError(f"{path}: tensor data is truncated; {_FIX}")
    return _views(block, header)


def _views(block: np.ndarray, header: SafetensorsHeader) -> dict[str, np.ndarray]:
    return {
        name: block[info.begin : info.end].view(DTYPES[info.dtype]).reshape(info.shape)
        for name, info in header.tensors.items()
    }


def check_finite(path: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """Refuse NaN or Inf weights: they would silently poison every row sharing a batch."""
    for name, array in tensors.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BundleError(f"{path}: tensor {name!r} contains NaN or Inf; fix the adapter")
