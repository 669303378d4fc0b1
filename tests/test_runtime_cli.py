"""`peft-export run` and `peft-export inspect` on a tiny bundle, and their failure modes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import save_tiny_tokenizer, tiny_model

from peft_export.exporter.cli import main
from peft_export.runtime import load_bundle

CLI = "import sys; from peft_export.exporter.cli import main; main(sys.argv[1:])"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from peft_export.exporter.pipeline import export_model

    root = tmp_path_factory.mktemp("cli")
    tokenizer = save_tiny_tokenizer(root / "tokenizer")
    export_model(tiny_model("llama", seed=0), root / "bundle", tokenizer_dir=tokenizer)
    return root / "bundle"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_matches_python_api(bundle_dir, capsys):
    args = ["run", str(bundle_dir), "--prompt", "Hi", "--prompt", "Hello", "--max-new-tokens"]
    code, out, err = run_cli([*args, "5", "--json", "--threads", "1"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    expected = load_bundle(bundle_dir, threads=1).generate(["Hi", "Hello"], max_new_tokens=5)
    assert [r["token_ids"] for r in rows] == expected.token_ids
    assert [r["text"] for r in rows] == expected.texts


def test_run_stream_and_raw_prompt(bundle_dir, capsys):
    base = ["run", str(bundle_dir), "--prompt", "Hi", "--max-new-tokens", "4", "--threads", "1"]
    code, streamed, _ = run_cli([*base, "--stream"], capsys)
    assert code == 0
    code, plain, _ = run_cli(base, capsys)
    assert code == 0 and streamed == plain
    two = [*base, "--prompt", "Hello there"]
    code, streamed, _ = run_cli([*two, "--stream"], capsys)
    assert code == 0
    code, plain, _ = run_cli(two, capsys)
    assert code == 0 and sorted(streamed.split("\n[")) == sorted(plain.split("\n["))
    code, raw, _ = run_cli([*base, "--no-chat-template", "--json"], capsys)
    expected = load_bundle(bundle_dir, threads=1).generate(
        ["Hi"], max_new_tokens=4, chat_template=False
    )
    assert json.loads(raw)["token_ids"] == expected.token_ids[0]


def test_inspect(bundle_dir, capsys):
    code, out, _ = run_cli(["inspect", str(bundle_dir), "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["mode"] == "merged" and summary["precision"] == "fp32"
    assert summary["kv"]["num_layers"] == 2
    names = [entry["name"] for entry in summary["graph"]["inputs"]]
    assert "past_key_values.{0..1}.key" in names
    assert summary["tokenizer"]["chat_template"] is True
    code, text, _ = run_cli(["inspect", str(bundle_dir)], capsys)
    assert code == 0 and "merged" in text and "past_key_values.{0..1}.value" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "{missing}", "--prompt", "x"], "not a bundle directory"),
        (["inspect", "{missing}"], "not a bundle directory"),
        (["run", "{bundle}", "--prompt", "x", "--adapter", "fr"], "takes no adapters"),
        (["run", "{bundle}", "--prompt", "x", "--max-new-tokens", "9999"], "positions"),
        (["run", "{bundle}", "--prompt", "a", "--prompt", "b", "--adapter", "x", "--adapter", "y",
          "--adapter", "z"], "one --adapter per --prompt"),
    ],
)  # fmt: skip
def test_errors_are_one_line_exit_2(bundle_dir, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "nope", bundle=bundle_dir) for a in args]
    proc = subprocess.run(
        [sys.executable, "-c", CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_manifest_is_refused(bundle_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["graph"]["file"] = "../model.onnx"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(["run", str(broken), "--prompt", "x"], capsys)
    assert code == 2 and "escapes the bundle" in err


def test_runtime_bundle_inspect_and_adapters(tmp_path, capsys):
    from tiny import make_adapter, save_tiny_base

    base = save_tiny_base("llama", tmp_path / "base")
    model = tiny_model("llama", seed=0)
    lora = make_adapter(model, "lora", tmp_path, name="fr")
    prefix = make_adapter(model, "prefix_tuning", tmp_path, name="pre")
    out = tmp_path / "bundle"
    export = ["export", "--base", str(base), "--mode", "runtime", "--out", str(out)]
    export += ["--adapter", f"fr={lora}", "--adapter", f"pre={prefix}"]
    code, _, err = run_cli(export, capsys)
    assert code == 0, err

    code, text, _ = run_cli(["inspect", str(out), "--json"], capsys)
    summary = json.loads(text)
    assert summary["mode"] == "runtime"
    assert summary["adapters"]["installed"]["fr"]["method"] == "lora"
    assert summary["adapters"]["installed"]["pre"]["method"] == "prefix_tuning"
    assert "adapter_ids" in [entry["name"] for entry in summary["graph"]["inputs"]]

    args = ["run", str(out), "--max-new-tokens", "4", "--json", "--threads", "1"]
    prompts = ["--prompt", "Hi", "--prompt", "Hi", "--prompt", "Hi"]
    adapters = ["--adapter", "fr", "--adapter", "pre", "--adapter", "-"]
    code, text, err = run_cli([*args, *prompts, *adapters], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["adapter"] for r in rows] == ["fr", "pre", None]
    assert len({tuple(r["token_ids"]) for r in rows}) == 3

    code, _, err = run_cli([*args, "--prompt", "Hi", "--adapter", "nope"], capsys)
    assert code == 2 and "unknown adapter(s) nope (installed: fr, pre)" in err
