"""The `peft-export` CLI run in-process by tests."""

from __future__ import annotations

from peft_export.exporter.cli import main


def run_cli(*argv: str) -> int:
    """Run `peft-export ARGV...`; returns its exit code (stdout/stderr go to capsys)."""
    try:
        main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
