"""`verify --engine trt` stops cleanly, with the reason, where an engine cannot execute."""

from __future__ import annotations

import pytest
from test_trt_runtime import manifest, record

from peft_export.bundle import names
from peft_export.exporter.engines import verify
from peft_export.exporter.engines.build import EngineOptions, export_engine_step
from peft_export.exporter.errors import ExportError


def write(tmp_path, *engines) -> str:
    (tmp_path / names.MANIFEST).write_text(manifest(*engines).to_json())
    return str(tmp_path)


def test_no_engine_says_how_to_build_one(tmp_path) -> None:
    with pytest.raises(ExportError, match="build-engine"):
        verify.require_trt_execution(write(tmp_path))


def test_no_gpu_stops_with_the_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(verify, "gpu_compute_capability", lambda: None)
    with pytest.raises(ExportError, match="needs an NVIDIA GPU"):
        verify.require_trt_execution(write(tmp_path, record()))


def test_engine_for_another_gpu_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(verify, "gpu_compute_capability", lambda: "9.0")
    with pytest.raises(ExportError, match=r"GPU 9\.0.*model_rtx_sm86_fp32"):
        verify.require_trt_execution(write(tmp_path, record()))


def test_export_step_builds_only_for_engine_trt(tmp_path) -> None:
    class Context:
        options = {"engine": "onnx", **vars(EngineOptions())}

    export_engine_step(tmp_path, manifest(), Context())
    assert not (tmp_path / "engines").exists()
