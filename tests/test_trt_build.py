"""Real TensorRT engine builds of exported bundles (TensorRT-RTX ahead of time, no GPU).

A build failure fails the test: this is CI's check that every exported graph is buildable.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from peft_export.bundle import names
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.engines import builder as engine_builder
from peft_export.exporter.engines import refit
from peft_export.exporter.engines.build import EngineOptions, build_engines
from peft_export.exporter.engines.builder import BuildPlan, create_network_and_config
from peft_export.exporter.engines.profiles import DimRange, ProfileRequest, derive_profiles
from peft_export.exporter.engines.trt_backend import select_backend
from peft_export.exporter.errors import ExportError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None
    and importlib.util.find_spec("tensorrt") is None,
    reason="neither TensorRT nor TensorRT-RTX is installed",
)

SMALL = EngineOptions(batch="1:2:4", seq="1:8:32", past="0:16:64", progress=False)


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PEFT_EXPORT_CACHE", str(tmp_path / "cache"))


def export_tiny(out: Path, arch: str, *, precision: str = "fp32", method: str | None = "lora"):
    """A merged bundle of a tiny model (with a LoRA folded in, so merge paths are covered)."""
    from tiny import make_adapter, tiny_model

    from peft_export.exporter.pipeline import export_model

    model = tiny_model(arch)
    if method is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, make_adapter(model, method, out.parent / "ad"))
    export_model(model, out, precision=precision)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trt_bundles")
    return {
        arch: export_tiny(root / arch, arch, method="lora" if arch != "gpt2" else "ia3")
        for arch in ("llama", "qwen2", "gpt2")
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_merged_bundles_build_for_every_architecture(bundles, arch) -> None:
    record = build_engines(bundles[arch], load_manifest(bundles[arch]), SMALL)
    engine = bundles[arch] / record.file
    assert engine.stat().st_size > 10_000
    assert record.backend in ("tensorrt", "tensorrt_rtx") and record.precision == "fp32"
    assert record.profiles == [
        {"batch": [1, 2, 4], "seq": [1, 8, 32], "past": [0, 0, 64]},
        {"batch": [1, 2, 4], "seq": [1, 1, 1], "past": [0, 16, 64]},
    ]
    reloaded = load_manifest(bundles[arch])
    assert [e.file for e in reloaded.engines].count(record.file) == 1
    assert reloaded.engines[-1] == record


def test_fp16_bundle_builds_strongly_typed(tmp_path) -> None:
    bundle = export_tiny(tmp_path / "fp16", "llama", precision="fp16")
    record = build_engines(bundle, load_manifest(bundle), SMALL)
    assert record.precision == "fp16" and record.file.endswith("_fp16.plan")
    backend = select_backend()
    manifest = load_manifest(bundle)
    plan = BuildPlan(manifest.graph, derive_profiles(manifest, _request(SMALL)))
    _, network, _, _ = create_network_and_config(backend, bundle / names.GRAPH, plan)
    logits = next(network.get_output(i) for i in range(network.num_outputs))
    assert logits.dtype == backend.module.DataType.HALF


def test_rebuild_comes_from_the_cache(bundles, monkeypatch) -> None:
    bundle = bundles["llama"]
    first = build_engines(bundle, load_manifest(bundle), SMALL)
    engine_bytes = (bundle / first.file).read_bytes()
    (bundle / first.file).unlink()

    def no_build(*args, **kwargs):
        raise AssertionError("a cached engine was rebuilt")

    monkeypatch.setattr("peft_export.exporter.engines.build.build_engine_bytes", no_build)
    again = build_engines(bundle, load_manifest(bundle), SMALL)
    assert again == first and (bundle / first.file).read_bytes() == engine_bytes
    wider = dataclasses.replace(SMALL, batch="1:2:8")
    with pytest.raises(AssertionError, match="rebuilt"):
        build_engines(bundle, load_manifest(bundle), wider)


def test_profiles_are_in_the_engine(bundles) -> None:
    """The serialized network carries both profiles with the derived dynamic ranges."""
    backend = select_backend()
    manifest = load_manifest(bundles["qwen2"])
    plan = BuildPlan(manifest.graph, derive_profiles(manifest, _request(SMALL)), ["8.6"])
    _, network, _, config = create_network_and_config(
        backend, bundles["qwen2"] / "model.onnx", plan
    )
    assert config.num_optimization_profiles == 2
    assert network.get_input(0).shape[0] == -1 and network.get_input(0).shape[1] == -1
    if backend.is_rtx:
        assert config.num_compute_capabilities == 1


def test_refit_marks_only_projection_weights(bundles) -> None:
    """With a GPU this builds; here the flag and the marked weights are checked pre-build."""
    backend = select_backend()
    bundle = bundles["llama"]
    manifest = load_manifest(bundle)
    targets = refit.refit_targets(bundle / names.GRAPH)
    weights = refit.refittable_initializers(targets)
    assert len(weights) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    plan = BuildPlan(manifest.graph, derive_profiles(manifest, _request(SMALL)), ["8.6"], weights)
    _, network, _, config = create_network_and_config(backend, bundle / names.GRAPH, plan)
    assert config.get_flag(backend.module.BuilderFlag.REFIT_INDIVIDUAL)
    assert not config.get_flag(backend.module.BuilderFlag.REFIT)
    assert all(network.are_weights_marked_refittable(w) for w in weights)


def test_refit_build_without_gpu_fails_with_the_reason(bundles) -> None:
    from peft_export.exporter.engines.gpu import gpu_compute_capability

    if not select_backend().is_rtx or gpu_compute_capability() is not None:
        pytest.skip("measures TensorRT-RTX without a GPU")
    bundle = bundles["gpt2"]
    options = dataclasses.replace(SMALL, refit=True, engine_cache=False)
    with pytest.raises(ExportError, match="without a GPU"):
        build_engines(bundle, load_manifest(bundle), options)
    assert not list((bundle / "engines").glob("*refit*"))


def test_refit_is_refused_for_runtime_bundles(bundles, tmp_path) -> None:
    manifest = load_manifest(bundles["llama"])
    manifest.mode = "runtime"
    with pytest.raises(ExportError, match="drop --refit"):
        build_engines(bundles["llama"], manifest, dataclasses.replace(SMALL, refit=True))


def test_plugin_impl_needs_full_tensorrt_and_lora_banks(bundles) -> None:
    manifest = load_manifest(bundles["llama"])
    with pytest.raises(ExportError, match="runtime-mode"):
        build_engines(bundles["llama"], manifest, dataclasses.replace(SMALL, lora_impl="plugin"))
    if select_backend().is_rtx:
        with pytest.raises(ExportError, match="--lora-impl onnx"):
            engine_builder._load_lora_plugin(select_backend())


def test_cli_build_engine_and_bad_input(bundles, capsys) -> None:
    from peft_export.exporter.cli import main

    bundle = str(bundles["gpt2"])
    main(
        [
            "build-engine",
            bundle,
            "--batch",
            "1:1:2",
            "--seq",
            "1:4:16",
            "--past",
            "0:8:32",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert "engines/" in out and "fp32" in out
    manifest = json.loads((bundles["gpt2"] / "manifest.json").read_text())
    assert any(e["profiles"][0]["batch"] == [1, 1, 2] for e in manifest["engines"])
    with pytest.raises(SystemExit) as exit_info:
        main(["build-engine", bundle, "--batch", "4:2:1"])
    assert exit_info.value.code == 2
    assert "min:opt:max" in capsys.readouterr().err


def _request(options: EngineOptions) -> ProfileRequest:
    return ProfileRequest(
        DimRange.parse(options.batch, "--batch"),
        DimRange.parse(options.seq, "--seq"),
        DimRange.parse(options.past, "--past"),
    )


def test_export_engine_trt_for_runtime_lora_banks(tmp_path) -> None:
    """`export --mode runtime --engine trt`: banks, adapter_ids and the MultiLoRA body build."""
    import onnx
    from tiny import make_adapter, save_tiny_base, tiny_model

    from peft_export.exporter.cli import main

    pytest.importorskip("peft_export.exporter.runtime_adapters.planner")
    base = save_tiny_base("qwen2", tmp_path / "base")
    model = tiny_model("qwen2")
    fr = make_adapter(model, "lora", tmp_path, name="fr")
    de = make_adapter(model, "dora", tmp_path, name="de", seed=2)
    out = tmp_path / "bundle"
    args = ["export", "--base", str(base), "--adapter", f"fr={fr}", "--adapter", f"de={de}"]
    args += ["--mode", "runtime", "--slots", "4", "--engine", "trt", "--batch", "1:2:4"]
    main([*args, "--seq", "1:8:32", "--past", "0:16:64", "--out", str(out)])
    manifest = load_manifest(out)
    graph = onnx.load(str(out / names.GRAPH), load_external_data=False)
    assert any(f.name == names.MULTILORA_OP for f in graph.functions)
    assert manifest.graph.input(names.ADAPTER_IDS) is not None
    (record,) = manifest.engines
    assert record.lora_impl == "onnx" and (out / record.file).is_file()
    assert record.profiles[0]["slots"] == record.profiles[1]["slots"] == [4, 4, 4]


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_prompt_side_bundles_build(tmp_path, method) -> None:
    from tiny import make_adapter, tiny_model

    from peft_export.exporter.pipeline import InMemoryBase, export_bundle

    planner = pytest.importorskip("peft_export.exporter.prompt_adapters.planner")
    model = tiny_model("llama")
    adapter = make_adapter(model, method, tmp_path, name="p")
    out = tmp_path / "bundle"
    manifest = export_bundle(
        InMemoryBase(model),
        [("p", adapter)],
        out=out,
        mode="runtime",
        planners=[planner.plan_prompt_inputs],
    )
    record = build_engines(out, manifest, SMALL)
    layout = manifest.adapters
    if layout.prompt_max_len:
        prompt = layout.prompt_max_len
        assert record.profiles[0]["prompt_len"] == [0, prompt, prompt]
    else:
        assert layout.prefix_max_len > 0
        assert record.profiles[1]["past"][2] >= layout.prefix_max_len
    assert (out / record.file).stat().st_size > 10_000


@pytest.mark.parametrize("level", ["int4", "int8"])
def test_quantized_portable_bundle_builds_as_weight_only(tmp_path, level) -> None:
    """A --quantize bundle's DequantizeLinear -> MatMul parses into dequantize layers over
    INT4 / INT8 weights (TensorRT's weight-only form), and the engine builds."""
    from tiny import make_adapter, tiny_model

    from peft_export.exporter.pipeline import InMemoryBase, export_bundle
    from peft_export.exporter.quantize.scheme import QuantScheme
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks

    base = tiny_model("llama")
    bundle = tmp_path / level
    export_bundle(
        InMemoryBase(base),
        [("a", make_adapter(base, "lora", tmp_path))],
        out=bundle,
        mode="runtime",
        planners=[plan_lora_banks],
        quantize=QuantScheme.parse(level, engine="trt"),
    )
    manifest = load_manifest(bundle)
    backend = select_backend()
    plan = BuildPlan(manifest.graph, derive_profiles(manifest, _request(SMALL)))
    _, network, _, _ = create_network_and_config(backend, bundle / names.GRAPH, plan)
    trt = backend.module
    want = trt.DataType.INT4 if level == "int4" else trt.DataType.INT8
    dequantized = [
        network.get_layer(i)
        for i in range(network.num_layers)
        if network.get_layer(i).type == trt.LayerType.DEQUANTIZE
    ]
    assert len(dequantized) == len(manifest.quantization.modules)
    assert {layer.get_input(0).dtype for layer in dequantized} == {want}
    record = build_engines(bundle, manifest, SMALL)
    assert (bundle / record.file).stat().st_size > 10_000
