"""The README's architecture table is the registry's: adding a family without regenerating
the README (python scripts/support_table.py) fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from peft_export.models.architectures import ARCHITECTURES
from peft_export.models.support_table import BEGIN, END, architecture_table, render, update_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_matches_the_registry() -> None:
    assert update_readme(README, check=True), (
        "README's architecture table differs from models/architectures.py; "
        "run python scripts/support_table.py"
    )


def test_every_registered_family_has_a_row() -> None:
    table = architecture_table()
    for name in ARCHITECTURES:
        assert f"| `{name}` |" in table


def test_drift_is_detected_and_rewritten(tmp_path) -> None:
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{BEGIN}\n| `llama` | old row |\n{END}\nafter\n")
    assert not update_readme(stale, check=True)
    assert "old row" in stale.read_text()
    assert not update_readme(stale)
    assert update_readme(stale, check=True)
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{END}\nafter\n")


def test_missing_markers_are_refused() -> None:
    with pytest.raises(ValueError, match="markers"):
        render("no table here")
