"""`export --quantize` from the command line: verify's report, and every bad option refused.

Bad options are refused before the base is loaded (one line, exit code 2, nothing written).
"""

from __future__ import annotations

import json

import pytest
from cli_run import run_cli
from tiny import make_adapter, save_tiny_base, tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-cli")
    llama = tiny_model("llama")
    return {
        "root": root,
        "base": save_tiny_base("llama", root / "base"),
        "lora": make_adapter(llama, "lora", root, seed=1),
    }


def test_int8_runtime_bundle_verifies_and_reports_quantizations_effect(tiny):
    out = tiny["root"] / "int8"
    args = ("--base", str(tiny["base"]), "--mode", "runtime", "--adapter", f"fr={tiny['lora']}")
    assert run_cli("export", *args, "--quantize", "int8", "--out", str(out)) == 0
    assert run_cli("verify", str(out), "--prompt", "hello", "--max-new-tokens", "6") == 0
    report = json.loads((out / "reports" / "parity.json").read_text())
    assert report["passed"]
    assert all(a["prefill_logits"]["max_abs"] <= 1e-4 for a in report["adapters"])
    quantization = report["quantization"]
    assert quantization["bits"] == 8 and quantization["layers"] == {"rtn": 15}
    effect = quantization["vs_unquantized"]
    assert set(effect) == {"base", "fr"}
    for entry in effect.values():
        assert 0 < entry["top1_agreement"] <= 1 and entry["mean_kl"] > 0


def test_skipped_layers_stay_float(tiny, capsys):
    out = tiny["root"] / "skip"
    args = ("--base", str(tiny["base"]), "--quantize", "int4", "--quant-skip", "lm_head")
    assert run_cli("export", *args, "--quant-skip", "*.down_proj", "--out", str(out)) == 0
    record = json.loads((out / "manifest.json").read_text())["quantization"]
    assert record["kept"] == {
        "lm_head": "--quant-skip",
        "model.layers.0.mlp.down_proj": "--quant-skip",
        "model.layers.1.mlp.down_proj": "--quant-skip",
    }
    assert len(record["modules"]) == 12
    capsys.readouterr()
    code = run_cli("inspect", str(out), "--json")
    assert code == 0
    summary = json.loads(capsys.readouterr().out)["quantization"]
    assert summary["layers"] == {"rtn int4": 12} and len(summary["kept"]) == 3
    assert run_cli("inspect", str(out)) == 0
    assert "quantized   block 32" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--quantize", "int3"], "--quantize"),
        (["--quantize", "int4", "--quant-block", "48"], "--quant-block"),
        (["--quantize", "int4", "--precision", "fp16"], "--quantize keeps activations in fp32"),
        (["--quantize", "int4", "--quant-format", "matmulnbits", "--engine", "trt"], "qdq"),
        (["--quantize", "int4", "--quant-accuracy", "7"], "--quant-accuracy"),
    ],
)
def test_bad_quantize_options_are_one_line(tiny, tmp_path, capsys, options, message):
    out = tmp_path / "bundle"
    assert run_cli("export", "--base", str(tiny["base"]), *options, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_skipping_every_layer_is_refused_after_loading(tiny, tmp_path, capsys):
    out = tmp_path / "bundle"
    args = ("--base", str(tiny["base"]), "--quantize", "int4", "--quant-skip", "*")
    assert run_cli("export", *args, "--out", str(out)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and "selected no linear layer" in last
    assert not out.exists()
