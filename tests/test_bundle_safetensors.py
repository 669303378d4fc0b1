"""Header-checked safetensors reading: valid files load, hostile ones raise BundleError only."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from bundle_fixtures import write_adapter
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_export.bundle import BundleError
from peft_export.bundle.safetensors_io import check_finite, read_header, read_tensors


def _raw(header: dict, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def test_reads_what_safetensors_writes(tmp_path):
    path = write_adapter(tmp_path / "a.safetensors", rank=3)
    header = read_header(path)
    assert header.metadata["method"] == "lora"
    tensors = read_tensors(path, header)
    assert {t.shape for t in tensors.values()} == {(3, 8), (8, 3)}
    from safetensors.numpy import load_file

    for name, value in load_file(str(path)).items():
        np.testing.assert_array_equal(tensors[name], value)


def test_reads_into_one_block(tmp_path):
    """With `allocate`, tensors are views of one block and equal a plain read."""
    path = write_adapter(tmp_path / "a.safetensors", rank=3)
    blocks = []

    def allocate(nbytes: int) -> np.ndarray:
        blocks.append(np.full(nbytes, 0xAB, dtype=np.uint8))
        return blocks[-1]

    viewed = read_tensors(path, allocate=allocate)
    plain = read_tensors(path)
    assert len(blocks) == 1 and viewed.keys() == plain.keys()
    for name, value in plain.items():
        np.testing.assert_array_equal(viewed[name], value)
        assert np.shares_memory(viewed[name], blocks[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated"),
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**12), "header length"),
        (_raw({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), "outside the file"),
        (
            _raw({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
            "does not match",
        ),
        (
            _raw({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "unsupported dtype",
        ),
        (
            _raw({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "invalid shape",
        ),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlap",
        ),
        (_raw({"__metadata__": {"k": 1}}), "__metadata__"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (_raw([1, 2]), "not an object"),
    ],
)
def test_hostile_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(BundleError, match=message):
        read_tensors(path)


def test_total_size_limit(tmp_path):
    path = write_adapter(tmp_path / "a.safetensors")
    with pytest.raises(BundleError, match="exceed"):
        read_header(path, max_total_bytes=16)


def test_nan_refused(tmp_path):
    with pytest.raises(BundleError, match="NaN or Inf"):
        check_finite(tmp_path / "x", {"w": np.array([1.0, np.inf], dtype=np.float32)})


@settings(max_examples=300, deadline=2000)
@given(
    offset=st.integers(0, 400),
    value=st.integers(0, 255),
    cut=st.integers(0, 600),
)
def test_mutated_headers_raise_only_bundle_error(tmp_path_factory, offset, value, cut):
    """Flip a byte and truncate: the reader returns tensors or raises BundleError, no hang."""
    path = write_adapter(tmp_path_factory.mktemp("fuzz") / "a.safetensors")
    data = bytearray(path.read_bytes())
    data[min(offset, len(data) - 1)] = value
    path.write_bytes(bytes(data[: max(cut, 0) or len(data)]))
    with contextlib.suppress(BundleError):
        read_tensors(path)
