"""The method support matrix, rendered from the registry (bundle/methods.py).

`peft-export methods` prints it; the README's method table is the markdown rendering between
its markers, rewritten by `python -m peft_export.exporter.method_table README.md` and
checked by tests/test_method_registry.py, so the table cannot drift from the registry.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from peft_export.bundle.methods import METHODS, Method

START = "<!-- methods-table:start (generated from bundle/methods.py; do not edit) -->"
END = "<!-- methods-table:end -->"


def rows() -> list[dict[str, Any]]:
    """One JSON-able row per registry entry: what each mode does with the method."""
    return [
        {
            "method": m.name,
            "label": m.label,
            "peft_type": m.peft_type,
            "merged": m.merged,
            "merge_refusal": m.merge_refusal or None,
            "runtime": m.runtime,
            "runtime_refusal": m.runtime_refusal or None,
            "how": m.how or None,
            "needs_base_weights": m.needs_base_weights,
        }
        for m in METHODS
    ]


def uncovered_peft_types() -> list[str]:
    """PeftType values of the installed peft that no registry entry classifies."""
    from peft.utils import PeftType

    known = {m.peft_type for m in METHODS}
    return [t.value for t in PeftType if t.value not in known]


def _merged_cell(method: Method) -> str:
    return "yes (PEFT merge)" if method.merged else "refused"


def _runtime_cell(method: Method) -> str:
    return method.runtime or "refused"


def _note(method: Method) -> str:
    if method.runtime is not None:
        return method.how
    return method.runtime_refusal


def render_text() -> str:
    """The matrix as aligned plain text (`peft-export methods`)."""
    table = [("method", "PEFT type", "merged", "runtime", "how it enters the graph / why not")]
    for m in METHODS:
        table.append((m.name, m.peft_type or "-", _merged_cell(m), _runtime_cell(m), _note(m)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = []
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[4]]).rstrip())
    return "\n".join(lines)


def render_markdown() -> str:
    """The README's method table (between START and END)."""
    lines = [
        "| method | PEFT type | merged | runtime inputs | how it enters the graph / why not |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS:
        peft_type = f"`{m.peft_type}`" if m.peft_type else "-"
        lines.append(
            f"| {m.label} | {peft_type} | {_merged_cell(m)} | {_runtime_cell(m)} | {_note(m)} |"
        )
    return "\n".join(lines)


def replace_table(text: str) -> str:
    """`text` with the part between the markers replaced by the current table."""
    if START not in text or END not in text:
        raise ValueError(f"the README lacks the markers {START!r} ... {END!r}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render_markdown()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    """Rewrite the table in the given README (default ./README.md)."""
    path = Path(argv[0] if argv else "README.md")
    path.write_text(replace_table(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
