"""`export --engine trt` checks every engine option before any export work, and its default
profiles fit the model's context. No engine is built: the builder is replaced by a stub that
records the plan, since everything checked here happens before the build."""

from __future__ import annotations

import importlib.util
import json

import pytest
from cli_run import run_cli
from tiny import make_adapter, save_tiny_base, tiny_model

from peft_export.exporter import base_model, pipeline
from peft_export.exporter.engines import build

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None,
    reason="TensorRT-RTX is not installed (builds ahead of time, without a GPU)",
)
POSITIONS = 256


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-options")
    base = save_tiny_base("llama", root / "base")
    model = tiny_model("llama")
    assert model.config.max_position_embeddings == POSITIONS
    return base, make_adapter(model, "lora", root, name="fr")


@pytest.fixture
def builds(monkeypatch, tmp_path):
    """Every BuildPlan the engine builder is asked for (it returns fake engine bytes)."""
    monkeypatch.setenv("PEFT_EXPORT_CACHE", str(tmp_path / "cache"))
    plans = []

    def fake_build(backend, onnx_path, plan, **kwargs):
        plans.append(plan)
        return b"not an engine"

    monkeypatch.setattr(build, "build_engine_bytes", fake_build)
    return plans


def _export(base, out, *extra: str) -> list[str]:
    return ["export", "--base", str(base), "--out", str(out), "--engine", "trt", *extra]


def test_default_profiles_fit_a_256_position_model(inputs, builds, tmp_path, capsys):
    base, _ = inputs
    out = tmp_path / "bundle"
    assert run_cli(*_export(base, out, "--trt-backend", "tensorrt-rtx")) == 0, capsys.readouterr()
    (plan,) = builds
    prefill, decode = plan.profiles
    assert prefill["seq"][2] + prefill["past"][2] <= POSITIONS
    assert decode["past"][2] + 1 <= POSITIONS
    (record,) = json.loads((out / "manifest.json").read_text())["engines"]
    assert record["profiles"] == plan.profiles


def _one_error(err: str, message: str) -> bool:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    return len(errors) == 1 and message in errors[0] and "Traceback" not in err


def _never(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} before the engine options were checked")

    return refuse


MODEL_FREE = {
    "bad-range": (["--batch", "8:1"], "--batch '8:1' is not a range"),
    "zero-seq": (["--seq", "0:4:8"], "--seq must start at 1 or more"),
    "refit-runtime": (
        ["--mode", "runtime", "--refit", "--adapter", "{fr}"],
        "--refit applies to merged bundles",
    ),
    "plugin-merged": (["--lora-impl", "plugin"], "--lora-impl plugin applies to runtime-mode"),
    "bad-target": (
        ["--trt-backend", "tensorrt-rtx", "--compute-capability", "1.0"],
        "cannot target compute capability 1.0",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_FREE))
def test_model_free_options_are_checked_before_the_base_loads(
    case, inputs, builds, monkeypatch, tmp_path, capsys
):
    base, fr = inputs
    extra, message = MODEL_FREE[case]
    monkeypatch.setattr(base_model, "load_base", _never("the base model was loaded"))
    out = tmp_path / "bundle"
    argv = _export(base, out, *(a.format(fr=f"fr={fr}") for a in extra))
    assert run_cli(*argv) == 2
    assert _one_error(capsys.readouterr().err, message)
    assert not out.exists() and not builds


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seq", "1:16:200", "--past", "0:8:100"], "(300) exceeds the model's 256 positions"),
        (["--past", "0:8:300"], "exceeds the model's 256 positions"),
        (["--lora-impl", "plugin", "--mode", "runtime", "--prefix-max-len", "4"], "LoRA banks"),
    ],
    ids=["seq-and-past", "past-alone", "plugin-without-banks"],
)
def test_model_checks_run_before_the_graph_is_exported(
    extra, message, inputs, builds, monkeypatch, tmp_path, capsys
):
    base, _ = inputs
    monkeypatch.setattr(pipeline, "export_onnx", _never("the graph was exported"))
    out = tmp_path / "bundle"
    assert run_cli(*_export(base, out, "--trt-backend", "tensorrt-rtx", *extra)) == 2
    assert _one_error(capsys.readouterr().err, message)
    assert not out.exists() and not builds
