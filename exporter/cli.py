"""The `peft-export` command line. Each command lives in `exporter/commands/`.

Heavy imports (torch, transformers) happen inside the commands that need them, so `run`
and `inspect` start fast. Every PeftExportError is caught here, once: one line, exit 2.
"""

from __future__ import annotations

import sys

import click

from peft_export import __version__
from peft_export.bundle.errors import PeftExportError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peft-export")
def cli() -> None:
    """Export Hugging Face models with PEFT adapters to ONNX / TensorRT bundles and run them."""


def _register() -> None:
    from peft_export.exporter.commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        cli.main(args=argv, prog_name="peft-export", standalone_mode=False)
    except PeftExportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        where = f"; see '{exc.ctx.command_path} --help'" if exc.ctx else ""
        click.echo(f"error: {exc.format_message().rstrip('.')}{where}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
