"""Prompt-side adapters through the CLI: export, `adapters add` without re-export, refusals.

One tiny Llama bundle is exported with the real `export` command; adapters added later must
match PEFT's forward, and bad adapters are refused with one line (exit 2) that names the
fix, leaving the bundle untouched.
"""

from __future__ import annotations

import json
import shutil

import pytest
from prompt_helpers import check_row, peft_model, reference_greedy, run_rows
from tiny import make_adapter, save_tiny_base, tiny_model

from peft_export.exporter.cli import main
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.session import load_bundle

PROMPT = [7, 40, 99, 12, 61]


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI; return (exit code, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompt-cli")
    base_dir = save_tiny_base("llama", tmp / "base")
    base = tiny_model("llama")
    prefix = make_adapter(base, "prefix_tuning", tmp / "adapters", name="pre")
    bundle = tmp / "bundle"
    argv = [
        "export", "--base", str(base_dir), "--adapter", f"pre={prefix}", "--mode", "runtime",
        "--prompt-max-len", "6", "--adaption-max-len", "4", "--out", str(bundle),
    ]  # fmt: skip
    main(argv)
    return base, tmp, bundle


def snapshot(bundle) -> dict[str, bytes]:
    return {str(p.relative_to(bundle)): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}


def test_export_records_bounds(exported) -> None:
    _, _, bundle = exported
    layout = json.loads((bundle / "manifest.json").read_text())["adapters"]
    assert (layout["prefix_max_len"], layout["prompt_max_len"], layout["adaption_max_len"]) == (
        4,
        6,
        4,
    )
    assert layout["installed"]["pre"]["method"] == "prefix_tuning"


@pytest.mark.parametrize(
    ("method", "overrides"),
    [("prompt_tuning", {"num_virtual_tokens": 6}), ("adaption_prompt", {"adapter_layers": 1})],
)
def test_adapters_add_then_run_matches_peft(exported, capsys, method, overrides) -> None:
    base, tmp, bundle = exported
    adapter = make_adapter(base, method, tmp / "adapters", name=f"added-{method}", **overrides)
    code, err = cli(capsys, "adapters", "add", str(bundle), f"{method}={adapter}")
    assert code == 0, err
    loaded = load_bundle(bundle)
    (run,) = run_rows(loaded, [PROMPT], [method])
    check_row(run, peft_model(base, adapter), PROMPT)
    (prefix_run,) = run_rows(loaded, [PROMPT], ["pre"])
    check_row(prefix_run, peft_model(base, tmp / "adapters" / "pre"), PROMPT)


def test_loaded_bundle_serves_added_replaced_and_removed_adapters(exported, capsys) -> None:
    base, tmp, bundle = exported
    loaded = load_bundle(bundle)
    for seed in (1, 3):
        adapter = make_adapter(base, "p_tuning", tmp / f"swap-{seed}", name="swap", seed=seed)
        code, err = cli(capsys, "adapters", "add", str(bundle), f"swap={adapter}", "--replace")
        assert code == 0, err
        (run,) = run_rows(loaded, [PROMPT], ["swap"])
        check_row(run, peft_model(base, adapter), PROMPT)
    code, err = cli(capsys, "adapters", "remove", str(bundle), "swap")
    assert code == 0, err
    assert not (bundle / "adapters" / "swap.safetensors").exists()
    with pytest.raises(InferenceError, match="unknown adapter"):
        loaded.generate([PROMPT], adapters="swap", max_new_tokens=2, chat_template=False)


def _refused(capsys, bundle, adapter, *needles: str) -> None:
    before = snapshot(bundle)
    code, err = cli(capsys, "adapters", "add", str(bundle), f"bad={adapter}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0]
    assert snapshot(bundle) == before


def test_prefix_longer_than_bundle_allows(exported, capsys) -> None:
    base, tmp, bundle = exported
    long = make_adapter(base, "prefix_tuning", tmp / "bad", name="long", num_virtual_tokens=9)
    _refused(capsys, bundle, long, "9 virtual tokens", "--prefix-max-len 9")


def test_hidden_size_mismatch(exported, capsys) -> None:
    _, tmp, bundle = exported
    narrow = tiny_model("llama", hidden_size=32, intermediate_size=64)
    adapter = make_adapter(narrow, "prompt_tuning", tmp / "bad", name="narrow")
    _refused(capsys, bundle, adapter, "hidden size 64", "another base")


def test_prefix_for_another_base(exported, capsys) -> None:
    _, tmp, bundle = exported
    deeper = tiny_model("llama", num_hidden_layers=3)
    adapter = make_adapter(deeper, "prefix_tuning", tmp / "bad", name="deeper")
    _refused(capsys, bundle, adapter, "another base")


def _bundle_copy(bundle, tmp, name: str, edit) -> object:
    copy = tmp / name
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return load_bundle(copy)


def test_adapter_file_for_another_base_refused_at_run_time(exported) -> None:
    _, tmp, bundle = exported

    def other_base(manifest: dict) -> None:
        manifest["base_model"]["weights_sha256"] = "0" * 64

    loaded = _bundle_copy(bundle, tmp, "other-base", other_base)
    with pytest.raises(InferenceError, match="another base model") as info:
        loaded.generate([PROMPT], adapters="pre", max_new_tokens=2, chat_template=False)
    assert "\n" not in str(info.value)


def test_runtime_refuses_prefix_longer_than_bundle(exported) -> None:
    _, tmp, bundle = exported

    def shrink(manifest: dict) -> None:
        manifest["adapters"]["prefix_max_len"] = 2

    loaded = _bundle_copy(bundle, tmp, "short-prefix", shrink)
    with pytest.raises(InferenceError, match="--prefix-max-len 4"):
        loaded.generate([PROMPT], adapters="pre", max_new_tokens=2, chat_template=False)


def test_run_command_mixes_prefix_and_base_rows(exported, capsys) -> None:
    base, tmp, bundle = exported
    texts = ["ahoy there", "hello"]
    argv = ["run", str(bundle), "--json", "--max-new-tokens", "8", "--adapter", "pre"]
    argv += ["--adapter", "-", "--prompt", texts[0], "--prompt", texts[1]]
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = [json.loads(line) for line in captured.out.splitlines()]
    codec = load_bundle(bundle).codec
    eos = {2}
    for text, record, model in zip(
        texts, records, [peft_model(base, tmp / "adapters" / "pre"), base], strict=True
    ):
        ids = list(codec.encode_prompt(text, chat=True))
        tokens = record["token_ids"]
        assert tokens == reference_greedy(model, ids, 8)[: len(tokens)]
        assert len(tokens) == 8 or tokens[-1] in eos


def test_verify_passes_for_prompt_side_adapters(exported, capsys) -> None:
    _, _, bundle = exported
    argv = ["verify", str(bundle), "--prompt", "ahoy", "--max-new-tokens", "6"]
    code, err = cli(capsys, *argv, "--decode-steps", "3")
    assert code == 0, err
    report = json.loads((bundle / "reports" / "parity.json").read_text())
    text = json.dumps(report)
    assert "prefix_tuning" in text
    assert '"passed": false' not in text


def test_values_beyond_fp16_are_refused_before_writing(tmp_path) -> None:
    import numpy as np

    from peft_export.exporter.errors import ExportError
    from peft_export.exporter.prompt_adapters.adapter_file import write_prompt_adapter
    from peft_export.exporter.prompt_adapters.convert import PromptAdapter
    from peft_export.exporter.prompt_adapters.target import PromptTarget

    target = PromptTarget("llama", 2, 4, 2, 16, 64, "0" * 64, prompt_max_len=4)
    embeds = np.full((2, 64), 1e5, np.float32)
    adapter = PromptAdapter("big", "prompt_tuning", 2, {"prompt_embeds": embeds})
    path = tmp_path / "adapters" / "big.safetensors"
    with pytest.raises(ExportError, match="prompt_embeds overflows fp16"):
        write_prompt_adapter(adapter, path, target, precision="fp16")
    assert not path.exists() and not any(tmp_path.rglob("*.staging-*"))
    write_prompt_adapter(adapter, path, target, precision="fp32")
    assert path.is_file()
