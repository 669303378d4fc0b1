"""The method registry covers every PeftType of the installed peft, and the README's method
table and `peft-export methods` are renderings of it (no drift)."""

from __future__ import annotations

import json
from pathlib import Path

from cli_run import run_cli
from peft.utils import PeftType

from peft_export.bundle import methods
from peft_export.exporter import method_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_installed_peft_type_is_classified():
    assert method_table.uncovered_peft_types() == []
    known = {t.value for t in PeftType}
    stale = sorted({m.peft_type for m in methods.METHODS if m.peft_type} - known)
    assert stale == [], f"registry entries for PeftTypes peft no longer has: {stale}"


def test_entries_are_consistent():
    names = [m.name for m in methods.METHODS]
    assert len(names) == len(set(names))
    for m in methods.METHODS:
        assert bool(m.merge_refusal) != m.merged, m.name
        assert bool(m.runtime_refusal) == (m.runtime is None), m.name
        assert m.runtime is None or m.runtime in methods.RUNTIME_INPUTS, m.name
        assert m.runtime is None or m.how, m.name


def test_readme_table_is_generated_from_the_registry():
    text = README.read_text()
    assert method_table.replace_table(text) == text, (
        "README method table is stale: run 'python -m peft_export.exporter.method_table README.md'"
    )


def test_methods_command_prints_the_matrix(capsys):
    assert run_cli("methods", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["uncovered_peft_types"] == []
    assert [row["method"] for row in data["methods"]] == [m.name for m in methods.METHODS]
    assert run_cli("methods") == 0
    lines = capsys.readouterr().out.splitlines()
    for m, line in zip(methods.METHODS, lines[1:], strict=True):
        assert line.split()[0] == m.name
        assert ("refused" in line) == (not m.merged or m.runtime is None), line


def test_lora_config_flags_pick_the_variant():
    assert methods.method_for_config({"peft_type": "LORA"}).name == "lora"
    assert methods.method_for_config({"peft_type": "LORA", "use_rslora": True}).name == "rslora"
    both = {"peft_type": "LORA", "use_rslora": True, "use_dora": True}
    assert methods.method_for_config(both).name == "dora"
    assert methods.method_for_config({"peft_type": "VERA"}).name == "vera"
    assert methods.method_for_config({"peft_type": "NOPE"}) is None
