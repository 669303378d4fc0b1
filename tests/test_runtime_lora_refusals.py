"""Runtime mode refuses LoRA variants its bank inputs cannot represent, instead of serving
them wrongly."""

from __future__ import annotations

from cli_run import run_cli
from tiny import make_adapter, save_tiny_base, tiny_model


def test_lora_bias_is_refused_in_runtime_mode(tmp_path, capsys):
    base = save_tiny_base("llama", tmp_path / "base")
    adapter = make_adapter(tiny_model("llama"), "lora", tmp_path, lora_bias=True)
    out = tmp_path / "bundle"
    args = ("--base", str(base), "--mode", "runtime", "--adapter", f"b={adapter}")
    assert run_cli("export", *args, "--out", str(out)) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err
    assert "lora_bias" in line and "--mode merged" in line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "lora"]


def test_scale_that_overflows_the_bundle_precision_is_refused(tmp_path, capsys):
    """Conversion runs in float64; a scale finite there but not in fp32 must not be written."""
    import json

    base = save_tiny_base("llama", tmp_path / "base")
    adapter = make_adapter(tiny_model("llama"), "lora", tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 1e300
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "bundle"
    args = ("--base", str(base), "--mode", "runtime", "--adapter", f"b={adapter}")
    assert run_cli("export", *args, "--out", str(out)) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "overflows fp32" in line
    assert not out.exists()
