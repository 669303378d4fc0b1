"""CLI commands, one module each; importing a command module must not import torch."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

from peft_export.exporter.commands import inspect, run  # noqa: E402

COMMANDS += [run.command, inspect.command]

from peft_export.exporter.commands import build_engine  # noqa: E402

COMMANDS.append(build_engine.command)

from peft_export.exporter.commands import export  # noqa: E402

COMMANDS.append(export.command)

from peft_export.exporter.commands import adapters  # noqa: E402

COMMANDS.append(adapters.command)
