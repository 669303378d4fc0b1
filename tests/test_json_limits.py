"""Untrusted JSON is bounded before json.loads: nesting (RecursionError) and size of structure
(memory). The hypothesis fuzzers of the readers never build input this deep or this large,
so these cases are explicit."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
from bundle_fixtures import manifest_dict
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_export.bundle import BundleError, load_manifest
from peft_export.bundle.safetensors_io import MAX_HEADER_BYTES, read_header

DEEP = 50_000


def _deep(levels: int, inner: str = "1") -> str:
    return "[" * levels + inner + "]" * levels


def _safetensors(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


TRICKY_TEXT = st.text(alphabet='[]{}"\\,:ab\n', max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY_TEXT, inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES)
def test_nesting_depth_ignores_brackets_quotes_and_escapes_in_strings(value):
    from peft_export.bundle.json_limits import load_json, nesting_depth

    raw = json.dumps(value).encode()
    assert nesting_depth(raw) == _depth(value)
    assert load_json(raw, where="x", fix="y") == value


def test_limits():
    from peft_export.bundle.json_limits import MAX_DEPTH, MAX_TOKENS, load_json

    assert load_json(_deep(MAX_DEPTH).encode(), where="x", fix="y") == json.loads(_deep(MAX_DEPTH))
    with pytest.raises(BundleError, match=f"x: JSON nested {MAX_DEPTH + 1} levels deep.*; y$"):
        load_json(_deep(MAX_DEPTH + 1).encode(), where="x", fix="y")
    many = b"[" + b"0," * MAX_TOKENS + b"0]"
    with pytest.raises(BundleError, match="values and separators, more than the 4000000"):
        load_json(many, where="x", fix="y")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_json(b"\xff", where="x", fix="y")


def test_deep_safetensors_header(tmp_path):
    path = tmp_path / "deep.safetensors"
    path.write_bytes(_safetensors(('{"t": ' + _deep(DEEP) + "}").encode()))
    with pytest.raises(BundleError, match=f"safetensors header: JSON nested {DEEP + 1} levels"):
        read_header(path)


def test_deep_manifest(tmp_path):
    data = json.dumps(manifest_dict())
    (tmp_path / "manifest.json").write_text(data[:-1] + ', "deep": ' + _deep(DEEP) + "}")
    with pytest.raises(BundleError, match=f"JSON nested {DEEP + 1} levels deep.*re-export"):
        load_manifest(tmp_path)


def test_deep_adapter_config(tmp_path):
    from peft_export.exporter.adapter_source import read_adapter
    from peft_export.exporter.errors import ExportError

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + _deep(DEEP) + "}")
    with pytest.raises(ExportError, match=f"JSON nested {DEEP + 1} levels deep.*re-save it"):
        read_adapter(folder)


def test_header_of_empty_lists_is_refused_without_gigabytes(tmp_path):
    """100 MB of `[[],[],...]` (under the 100 MiB header limit) would take ~2.5 GB inside
    json.loads; refused with 600 MB of address space to spare over the interpreter's own."""
    body = b"[" + b"[]," * (100_000_000 // 3) + b"[]]"
    assert 100_000_000 < len(body) <= MAX_HEADER_BYTES
    path = tmp_path / "lists.safetensors"
    path.write_bytes(_safetensors(body))
    del body
    script = textwrap.dedent(
        """
        import resource, sys
        from peft_export.bundle import BundleError
        from peft_export.bundle.safetensors_io import read_header
        vm = next(int(line.split()[1]) for line in open("/proc/self/status")
                  if line.startswith("VmSize:")) * 1024
        limit = vm + 600 * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            read_header(sys.argv[1])
        except BundleError as exc:
            print(exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repository root, whose peft_export/ would shadow PYTHONPATH
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "safetensors header: 100000003 JSON values and separators" in result.stdout
