"""`peft-export export` end to end on a tiny HF folder, and every bad input it must refuse."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from ort_graph import OrtGraph
from peft import PeftModel
from safetensors.numpy import save_file
from tiny import make_adapter, save_tiny_base, tiny_model
from transformers import AutoModelForCausalLM

from peft_export.bundle import load_manifest
from peft_export.bundle.lora_methods import BANK_ONLY_METHODS
from peft_export.exporter.bundle_writer import weights_sha256
from peft_export.exporter.cli import main
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph import onnx_export
from peft_export.exporter.pipeline import InMemoryBase, export_bundle, export_model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base("llama", tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    llama = tiny_model("llama")
    return {
        "lora": make_adapter(llama, "lora", root),
        "prefix_tuning": make_adapter(llama, "prefix_tuning", root),
        "other_base": make_adapter(
            tiny_model("llama", num_key_value_heads=4), "lora", root, name="o"
        ),
    }


def _run(argv):
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


def _load(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()


def test_export_lora_merged(base_dir, adapters, tmp_path, capsys):
    out = tmp_path / "bundle"
    args = ["export", "--base", str(base_dir), "--adapter", f"fr={adapters['lora']}"]
    assert _run([*args, "--method", "lora", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out

    manifest = load_manifest(out)
    base = _load(base_dir)
    assert manifest.mode == "merged"
    assert manifest.adapters.merged["name"] == "fr"
    assert manifest.base_model.architecture == "llama"
    assert manifest.base_model.weights_sha256 == weights_sha256(base)
    assert manifest.base_model.config["hidden_size"] == 64
    assert (manifest.kv.num_layers, manifest.kv.num_kv_heads, manifest.kv.head_dim) == (2, 2, 16)
    assert {"torch", "transformers", "peft", "onnx", "peft_export"} <= set(manifest.producer)
    names = [t.name for t in manifest.graph.inputs]
    assert names == [
        "input_ids",
        "attention_mask",
        "position_ids",
        *(f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")),
    ]
    assert manifest.graph.input("attention_mask").shape == ["batch", "past + seq"]
    assert [t.name for t in manifest.graph.outputs][:3] == [
        "logits",
        "present.0.key",
        "present.0.value",
    ]
    assert manifest.tokenizer.bos_token_id == 1 and manifest.tokenizer.eos_token_ids == [2]
    assert "assistant" in manifest.tokenizer.chat_template
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / file).is_file()
    graph = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in graph.graph.input] == names
    assert graph.opset_import[0].version == 18

    reference = PeftModel.from_pretrained(copy.deepcopy(base), adapters["lora"]).eval()
    ids = np.arange(4, 12)[None]
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(OrtGraph(out).step(ids), expected, atol=1e-4)

    assert _run([*args, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _run([*args, "--out", str(out), "--force"]) == 0


def test_plain_fp16_external_data(tmp_path):
    base = tiny_model("gpt2")
    out = tmp_path / "bundle"
    manifest = export_model(base, out, precision="fp16", external_data=True, source="tiny-gpt2")
    assert (out / "model.onnx.data").is_file()
    assert manifest.precision == "fp16" and manifest.kv.dtype == "float16"
    assert manifest.base_model.source == "tiny-gpt2"
    assert manifest.tokenizer.file is None
    assert manifest.graph.outputs[0].dtype == "float16"
    assert base.dtype == torch.float32, "the caller's model must not be converted"
    ids = np.arange(4, 14)[None]
    logits = OrtGraph(out).step(ids)
    assert logits.dtype == np.float16
    with torch.no_grad():
        expected = base(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits.astype(np.float32), expected, atol=2e-2)


def test_weights_over_the_threshold_go_beside_the_graph(tmp_path, monkeypatch):
    """Above EXTERNAL_DATA_THRESHOLD the weights go to model.onnx.data unasked (ONNX Runtime
    maps that file instead of parsing them into memory); below it the graph stays one file."""
    base = tiny_model("gpt2")
    export_model(base, tmp_path / "small", source="tiny-gpt2")
    assert not (tmp_path / "small" / "model.onnx.data").exists()
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1024)
    export_model(base, tmp_path / "large", source="tiny-gpt2")
    assert (tmp_path / "large" / "model.onnx.data").is_file()
    ids = np.arange(4, 14)[None]
    expected = OrtGraph(tmp_path / "small").step(ids)
    np.testing.assert_allclose(OrtGraph(tmp_path / "large").step(ids), expected, atol=1e-6)


def _pickle_only(folder):
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04junk")


def _nan(folder):
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.full(
            (4, 64), np.nan, np.float32
        )
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))


BAD_INPUTS = {
    "unknown-method": ("lora", ["--method", "qlora"], None, "unknown method 'qlora'"),
    "method-mismatch": ("lora", ["--method", "dora"], None, "is a lora adapter but --method dora"),
    "other-base": ("other_base", [], None, "trained on another base model"),
    "no-config": ("lora", [], lambda f: (f / "adapter_config.json").unlink(), "no adapter_config"),
    "bad-config": ("lora", [], lambda f: (f / "adapter_config.json").write_text("{"), "valid JSON"),
    "corrupt-weights": (
        "lora",
        [],
        lambda f: (f / "adapter_model.safetensors").write_bytes(b"\xff" * 12),
        "header length",
    ),
    "pickle-only": ("lora", [], _pickle_only, "peft-export adapters convert-bin"),
    "nan": ("lora", [], _nan, "NaN or Inf"),
    "prompt-side-merged": ("prefix_tuning", [], None, "--mode runtime"),
    "bad-mode": ("lora", ["--mode", "both"], None, "'both' is not one of 'merged', 'runtime'"),
    "bad-precision": (
        "lora",
        ["--precision", "int4"],
        None,
        "'int4' is not one of 'fp32', 'fp16', 'bf16'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    case, base_dir, adapters, tmp_path, capsys
):
    adapter_key, extra, damage, message = BAD_INPUTS[case]
    adapter = shutil.copytree(adapters[adapter_key], tmp_path / "adapter")
    if damage:
        damage(adapter)
    out = tmp_path / "out" / "bundle"
    argv = ["export", "--base", str(base_dir), "--adapter", str(adapter), *extra, "--out", str(out)]

    assert _run(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(out.parent.glob(".*")) if out.parent.exists() else True


def test_every_precision_the_error_names_is_accepted(base_dir, tmp_path, capsys):
    """The --precision error lists what a manifest may record, and bf16 (listed) exports."""
    from typing import get_args

    from peft_export.bundle.manifest import Precision

    argv = ["export", "--base", str(base_dir), "--out", str(tmp_path / "bundle")]
    assert _run([*argv, "--precision", "int4"]) == 2
    listed = capsys.readouterr().err.split("is not one of ")[1].split(";")[0]
    assert listed == ", ".join(f"'{p}'" for p in get_args(Precision))
    assert _run([*argv, "--precision", "bf16"]) == 0, capsys.readouterr().err
    manifest = load_manifest(tmp_path / "bundle")
    assert manifest.precision == "bf16" and manifest.kv.dtype == "bfloat16"


def test_failure_after_staging_leaves_nothing(tmp_path):
    def broken_engine_step(stage, manifest, context):
        assert (stage / "model.onnx").is_file() and (stage / "manifest.json").is_file()
        raise ExportError("engine build failed; try again")

    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="engine build failed"):
        export_bundle(InMemoryBase(tiny_model("gpt2")), out=out, post_steps=[broken_engine_step])
    assert list(tmp_path.iterdir()) == []


def test_runtime_mode_without_a_planner_for_the_method(adapters, tmp_path):
    with pytest.raises(ExportError, match="runtime mode has no support for lora"):
        export_bundle(
            InMemoryBase(tiny_model("llama")),
            [("fr", adapters["lora"])],
            out=tmp_path / "b",
            mode="runtime",
            planners=[],
        )
    assert not (tmp_path / "b").exists()


def test_console_script_error_has_no_traceback(adapters, tmp_path):
    adapter = shutil.copytree(adapters["lora"], tmp_path / "adapter")
    _pickle_only(adapter)
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from peft_export.exporter.cli import main; main()"]
        + ["export", "--base", "x", "--adapter", str(adapter), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("error:")
    ]
    assert "convert-bin" in result.stderr
    assert json.dumps(result.stderr).count("Traceback") == 0


def test_unknown_architecture_lists_supported(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2
    )
    with pytest.raises(ExportError, match=r"'opt' is not supported \(supported: .*gpt2, .*llama, "):
        export_bundle(InMemoryBase(OPTForCausalLM(config)), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def _bank_inputs(bundle) -> set[str]:
    """Parts (A, B, out_scale, ...) of the graph's LoRA bank inputs."""
    return {
        t.name.rsplit(".", 1)[1]
        for t in load_manifest(bundle).graph.inputs
        if t.name[:5] == "lora."
    }


def test_runtime_export_accepts_the_whole_lora_family_unless_methods_narrows(
    base_dir, adapters, tmp_path, capsys
):
    """Issue 21 items 13 and 4: without --methods a runtime bundle exported with one plain
    LoRA takes rsLoRA, DoRA and IA3 by `adapters add`; `--methods lora` drops the scale
    inputs (and DoRA's base weights) but still takes every method that fills only A/B."""
    llama = tiny_model("llama")
    extra = {m: make_adapter(llama, m, tmp_path, seed=9) for m in ("rslora", "dora", "ia3", "loha")}
    default, narrow = tmp_path / "default", tmp_path / "narrow"
    runtime = ["--base", str(base_dir), "--mode", "runtime", "--max-rank", "16"]
    lora = f"lora={adapters['lora']}"
    assert _run(["export", *runtime, "--adapter", lora, "--out", str(default)]) == 0
    assert (
        _run(["export", *runtime, "--methods", "lora", "--adapter", lora, "--out", str(narrow)])
        == 0
    )
    assert _bank_inputs(default) == {"A", "B", "out_scale", "in_scale"}
    assert (default / "adapters" / "_base_targets.safetensors").is_file()
    assert _bank_inputs(narrow) == {"A", "B"}
    assert not (narrow / "adapters" / "_base_targets.safetensors").exists()
    capsys.readouterr()
    for method, folder in extra.items():
        assert _run(["adapters", "add", str(default), f"{method}={folder}"]) == 0, method
    assert {e.method for e in load_manifest(default).adapters.installed.values()} == {
        "lora",
        *extra,
    }
    assert load_manifest(narrow).adapters.methods == list(BANK_ONLY_METHODS)
    for method in ("rslora", "loha"):
        assert _run(["adapters", "add", str(narrow), f"{method}={extra[method]}"]) == 0, method
    capsys.readouterr()
    # IA3's first module in the model's order is q_proj, whose output it scales
    for method, part in (("dora", "out_scale"), ("ia3", "out_scale")):
        assert _run(["adapters", "add", str(narrow), f"{method}={extra[method]}"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f".{part}, which this bundle's graph lacks" in line, line
        assert f"--methods including {method}" in line, line
    assert set(load_manifest(narrow).adapters.installed) == {"lora", "rslora", "loha"}
