"""CLI commands, one module each; importing a command module must not import torch."""

from __future__ import annotations

import click

from peft_export.exporter.commands import (
    adapters,
    build_engine,
    export,
    inspect,
    methods,
    run,
    serve,
    verify,
)

COMMANDS: list[click.Command] = [
    export.command,
    verify.command,
    run.command,
    inspect.command,
    methods.command,
    adapters.command,
    build_engine.command,
    serve.command,
]
