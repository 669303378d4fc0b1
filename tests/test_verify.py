"""`peft-export verify`: passes on a faithful bundle, fails (exit 1) against another adapter."""

from __future__ import annotations

import json

import pytest
from cli_run import run_cli
from tiny import make_adapter, save_tiny_base, tiny_model


def _report(bundle):
    return json.loads((bundle / "reports" / "parity.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    llama = tiny_model("llama")
    return {
        "root": root,
        "base": save_tiny_base("llama", root / "base"),
        "lora": make_adapter(llama, "lora", root, seed=1),
        "other": make_adapter(llama, "lora", root, name="other", seed=7),
        "dora": make_adapter(llama, "dora", root, seed=3, r=2),
    }


@pytest.fixture(scope="module")
def merged(tiny):
    bundle = tiny["root"] / "merged"
    base, lora = str(tiny["base"]), f"fr={tiny['lora']}"
    assert run_cli("export", "--base", base, "--adapter", lora, "--out", str(bundle)) == 0
    return bundle


def test_merged_bundle_passes(merged, capsys):
    args = ("--prompt", "hello", "--prompt", "a b c", "--max-new-tokens", "8")
    assert run_cli("verify", str(merged), *args, "--decode-steps", "4") == 0
    report = _report(merged)
    assert report["passed"]
    (entry,) = report["adapters"]
    assert entry["prefill_logits"]["max_abs"] <= 1e-4
    assert entry["decode_logits"]["steps"] == 2 * 4
    assert entry["prompts_identical"] == 2
    assert "parity passed" in capsys.readouterr().out


def test_merged_bundle_fails_against_another_adapter(merged, tiny):
    other = f"fr={tiny['other']}"
    code = run_cli(
        "verify", str(merged), "--prompt", "hello", "--max-new-tokens", "4", "--source", other
    )
    assert code == 1
    assert not _report(merged)["passed"]


def test_runtime_bundle_checks_each_adapter_and_a_mixed_batch(tiny):
    bundle = tiny["root"] / "runtime"
    adapters = ("--adapter", f"a={tiny['lora']}", "--adapter", f"d={tiny['dora']}")
    args = ("--base", str(tiny["base"]), "--mode", "runtime", *adapters, "--out", str(bundle))
    assert run_cli("export", *args) == 0
    assert run_cli("verify", str(bundle), "--prompt", "hello", "--max-new-tokens", "6") == 0
    report = _report(bundle)
    assert [a["adapter"] for a in report["adapters"]] == [None, "a", "d"]
    assert all(a["prefill_logits"]["max_abs"] <= 1e-4 for a in report["adapters"])
    assert report["mixed_batch"] == {"rows": 3, "identical": True}


def test_verify_trt_without_gpu_stops_cleanly(merged, capsys):
    assert run_cli("verify", str(merged), "--engine", "trt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_verify_bad_bundle_is_one_line(tmp_path, capsys):
    assert run_cli("verify", str(tmp_path / "nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a bundle directory" in err[0]
