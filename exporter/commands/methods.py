"""`peft-export methods`: which adapter methods each export mode serves, and why not."""

from __future__ import annotations

import json

import click


@click.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print the matrix as JSON.")
def command(as_json: bool) -> None:
    """List every adapter method: merged (PEFT's own merge), runtime inputs, or refused."""
    from peft_export.exporter.method_table import render_text, rows, uncovered_peft_types

    try:
        uncovered = uncovered_peft_types()
    except ImportError:
        uncovered = None
    if as_json:
        click.echo(json.dumps({"methods": rows(), "uncovered_peft_types": uncovered}, indent=2))
        return
    click.echo(render_text())
    if uncovered:
        click.echo(f"\nnot classified (newer peft than this registry): {', '.join(uncovered)}")
