"""TensorRT runtime backend: the GPU-free parts (engine choice, profiles, shape checks);
the execution path runs only where TensorRT and a supported GPU exist."""

from __future__ import annotations

import dataclasses

import pytest

from peft_export.bundle import names
from peft_export.bundle.manifest import (
    BaseModelInfo,
    EngineRecord,
    GraphSpec,
    KVLayout,
    Manifest,
    TensorSpec,
)
from peft_export.runtime.backends import trt_cuda, trt_plan
from peft_export.runtime.errors import InferenceError

PROFILES = [
    {"batch": [1, 2, 4], "seq": [1, 8, 32], "past": [0, 0, 64]},
    {"batch": [1, 2, 4], "seq": [1, 1, 1], "past": [0, 16, 64]},
]


def record(**overrides) -> EngineRecord:
    fields = {
        "file": "engines/model_rtx_sm86_fp32.plan",
        "backend": "tensorrt_rtx",
        "version": "1.7.1.116",
        "precision": "fp32",
        "profiles": PROFILES,
        "compute_capability": "8.6,8.9",
    }
    return EngineRecord(**{**fields, **overrides})


def manifest(*engines: EngineRecord) -> Manifest:
    inputs = [
        TensorSpec(names.INPUT_IDS, "int64", ["batch", "seq"]),
        TensorSpec(names.ATTENTION_MASK, "int64", ["batch", "past + seq"]),
        TensorSpec(names.past_key(0), "float32", ["batch", 2, "past", 8]),
    ]
    return Manifest(
        base_model=BaseModelInfo("tiny", "llama", {}, "0" * 64),
        mode="merged",
        precision="fp32",
        opset=18,
        graph=GraphSpec(names.GRAPH, inputs, [TensorSpec(names.LOGITS, "float32", ["batch"])]),
        kv=KVLayout(1, 2, 8, "float32"),
        vocab_size=32,
        hidden_size=16,
        engines=list(engines),
    )


RTX = {"tensorrt_rtx": "1.7.1.116"}


def test_engine_selection_by_flavour_version_and_gpu() -> None:
    full = record(
        file="engines/full.plan", backend="tensorrt", version="10.9", compute_capability="9.0"
    )
    m = manifest(record(), full)
    assert trt_plan.select_engine(m, RTX, "8.9").file == record().file
    assert trt_plan.select_engine(m, {"tensorrt": "10.9"}, "9.0").file == "engines/full.plan"
    with pytest.raises(InferenceError, match="this GPU is 9.0"):
        trt_plan.select_engine(m, RTX, "9.0")
    with pytest.raises(InferenceError, match="no CUDA GPU"):
        trt_plan.select_engine(m, RTX, None)
    with pytest.raises(InferenceError, match="installed is 1.8"):
        trt_plan.select_engine(m, {"tensorrt_rtx": "1.8"}, "8.6")
    with pytest.raises(InferenceError, match="build-engine"):
        trt_plan.select_engine(manifest(), RTX, "8.6")
    with pytest.raises(InferenceError, match="no engine"):
        trt_plan.select_engine(m, RTX, "8.6", file="engines/other.plan")


def test_step_dims_and_profile_choice() -> None:
    m = manifest(record())
    decode = {
        names.INPUT_IDS: (3, 1),
        names.ATTENTION_MASK: (3, 21),
        names.past_key(0): (3, 2, 20, 8),
    }
    dims = trt_plan.step_dims(m.graph, decode)
    assert dims == {"batch": 3, "seq": 1, "past": 20}
    assert trt_plan.choose_profile(record(), dims) == trt_plan.DECODE
    prefill = {"batch": 2, "seq": 12, "past": 0}
    assert trt_plan.choose_profile(record(), prefill) == trt_plan.PREFILL
    assert trt_plan.choose_profile(record(), {"batch": 1, "seq": 1, "past": 0}) == trt_plan.DECODE
    with pytest.raises(InferenceError, match="batch 5 is outside 1..4"):
        trt_plan.choose_profile(record(), {"batch": 5, "seq": 4, "past": 0})
    with pytest.raises(InferenceError, match="seq 40"):
        trt_plan.choose_profile(record(), {"batch": 1, "seq": 40, "past": 0})


def test_inconsistent_step_inputs_are_refused() -> None:
    m = manifest(record())
    with pytest.raises(InferenceError, match="disagree"):
        trt_plan.step_dims(m.graph, {names.INPUT_IDS: (3, 1), names.past_key(0): (2, 2, 4, 8)})


def test_backend_is_registered_and_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import peft_export.runtime.backends.trt as t; "
        "from peft_export.runtime.backends import BACKENDS; "
        "assert BACKENDS['trt'].endswith('trt:TrtBackend'); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(trt_cuda.device_count() > 0, reason="checks the no-GPU path")
def test_loading_without_a_gpu_says_so(tmp_path) -> None:
    from peft_export.runtime.backends.trt import TrtBackend

    with pytest.raises(InferenceError, match="no CUDA GPU"):
        TrtBackend.from_bundle(tmp_path, manifest(record()))
    with pytest.raises(InferenceError, match="accepted: engine"):
        TrtBackend.from_bundle(tmp_path, manifest(record()), threads=2)


@pytest.mark.gpu
@pytest.mark.skipif(trt_cuda.device_count() == 0, reason="needs a CUDA GPU with TensorRT")
def test_engine_generates_like_onnx_runtime(tmp_path, monkeypatch) -> None:
    """Greedy tokens of the engine equal ONNX Runtime's on the same bundle."""
    from tiny import save_tiny_tokenizer, tiny_model

    from peft_export.bundle.manifest import load_manifest
    from peft_export.exporter.engines.build import EngineOptions, build_engines
    from peft_export.exporter.engines.trt_backend import select_backend
    from peft_export.exporter.pipeline import export_model
    from peft_export.runtime import load_bundle

    monkeypatch.setenv("PEFT_EXPORT_CACHE", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    export_model(tiny_model("llama"), bundle, tokenizer_dir=save_tiny_tokenizer(tmp_path / "tok"))
    gpu = trt_cuda.compute_capability()
    targets = (gpu,) if select_backend().is_rtx else ()
    options = EngineOptions(batch="1:2:4", seq="1:16:64", past="0:32:128", progress=False)
    try:
        build_engines(
            bundle, load_manifest(bundle), dataclasses.replace(options, compute_capability=targets)
        )
    except Exception as exc:  # an RTX build for an unsupported GPU (e.g. sm_90)
        pytest.skip(f"no engine for this GPU: {exc}")
    prompts = ["hello there", "a"]
    want = load_bundle(bundle, "ort").generate(prompts, max_new_tokens=8, ignore_eos=True)
    got = load_bundle(bundle, "trt").generate(prompts, max_new_tokens=8, ignore_eos=True)
    assert got.token_ids == want.token_ids
