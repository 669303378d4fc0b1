"""The tensorrt / tensorrt_rtx switch and the engine cache (no engine is built here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from peft_export.exporter.engines import cache as engine_cache
from peft_export.exporter.engines import trt_backend
from peft_export.exporter.engines.trt_backend import capability_enum_name, select_backend
from peft_export.exporter.errors import ExportError

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX (tensorrt-rtx-cu13) not installed")


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        trt_backend.importlib.util,
        "find_spec",
        lambda name, *a: None if name in modules else real(name, *a),
    )


@needs_rtx
def test_default_falls_back_to_rtx_when_tensorrt_is_absent(monkeypatch) -> None:
    hide(monkeypatch, "tensorrt")
    backend = select_backend()
    assert backend.name == "tensorrt_rtx" and backend.is_rtx and not backend.supports_plugins
    assert backend.version.count(".") >= 2


def test_forcing_a_missing_backend_says_how_to_install(monkeypatch) -> None:
    hide(monkeypatch, "tensorrt")
    with pytest.raises(ExportError, match=r"pip install"):
        select_backend("tensorrt")


def test_no_backend_at_all(monkeypatch) -> None:
    hide(monkeypatch, "tensorrt", "tensorrt_rtx")
    with pytest.raises(ExportError, match="not importable"):
        select_backend()


def test_unknown_backend_name() -> None:
    with pytest.raises(ExportError, match="tensorrt-rtx"):
        select_backend("onnxruntime")


@needs_rtx
def test_rtx_targets_named_compute_capabilities() -> None:
    backend = select_backend("tensorrt-rtx")
    assert backend.compute_capabilities([]) == ["8.6"]
    assert backend.compute_capabilities(["8.9", "12.0"]) == ["8.9", "12.0"]
    with pytest.raises(ExportError, match="choose from"):
        backend.compute_capabilities(["9.0"])
    trt = backend.module
    config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    backend.set_compute_capabilities(config, ["8.6", "8.9"])
    assert config.num_compute_capabilities == 2
    assert config.get_compute_capability(1) == trt.ComputeCapability.SM89


def test_capability_names() -> None:
    assert capability_enum_name("8.6") == "SM86"
    assert capability_enum_name("12.0") == "SM120"
    with pytest.raises(ExportError, match="8.6"):
        capability_enum_name("sm86")


def test_full_tensorrt_refuses_named_targets() -> None:
    backend = trt_backend.TrtBackend("tensorrt", module=np)
    with pytest.raises(ExportError, match="TensorRT-RTX only"):
        backend.compute_capabilities(["8.6"])
    assert backend.compute_capabilities([]) == []


# ---- engine cache ----


def small_onnx(path: Path, *, external: bool = False, scale: float = 1.0) -> Path:
    weight = numpy_helper.from_array(np.full((4, 4), scale, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path), save_as_external_data=external, size_threshold=0)
    return path


def test_cache_root_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PEFT_EXPORT_CACHE", str(tmp_path))
    assert engine_cache.cache_root() == tmp_path / "engines"
    monkeypatch.delenv("PEFT_EXPORT_CACHE")
    assert engine_cache.cache_root() == Path.home() / ".cache" / "peft-export" / "engines"


def test_cache_key_covers_every_part() -> None:
    parts = {"onnx": "a", "profiles": [{"batch": [1, 1, 8]}], "version": "1.7", "targets": "8.6"}
    key = engine_cache.cache_key(**parts)
    assert key == engine_cache.cache_key(**dict(reversed(parts.items())))
    for name, other in [
        ("onnx", "b"),
        ("profiles", [{"batch": [1, 2, 8]}]),
        ("version", "1.8"),
        ("targets", "8.9"),
    ]:
        assert engine_cache.cache_key(**{**parts, name: other}) != key


def test_onnx_hash_covers_external_data(tmp_path) -> None:
    inline = small_onnx(tmp_path / "inline.onnx")
    first = engine_cache.onnx_sha256(inline)
    assert first == engine_cache.onnx_sha256(inline)
    assert engine_cache.onnx_sha256(small_onnx(tmp_path / "inline.onnx", scale=2.0)) != first
    (tmp_path / "ext").mkdir()
    external = small_onnx(tmp_path / "ext" / "model.onnx", external=True)
    data_files = [p for p in external.parent.iterdir() if p != external]
    assert data_files, "the test graph must have external data"
    before = engine_cache.onnx_sha256(external)
    data_files[0].write_bytes(data_files[0].read_bytes()[:-4] + b"\0\0\0\1")
    assert engine_cache.onnx_sha256(external) != before


def test_cache_hit_miss_and_copy(tmp_path) -> None:
    cache = engine_cache.EngineCache(tmp_path / "cache")
    target = tmp_path / "bundle" / "engines" / "model.plan"
    assert cache.lookup("k1") is None
    assert not cache.copy_to("k1", target) and not target.exists()
    cache.store("k1", b"engine-bytes")
    assert cache.lookup("k1") == tmp_path / "cache" / "k1.plan"
    assert cache.copy_to("k1", target) and target.read_bytes() == b"engine-bytes"
    assert cache.lookup("k2") is None
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
