"""Export-command options of runtime-mode bottleneck banks (light: imported when the CLI starts)."""

from __future__ import annotations

from collections.abc import Callable

import click


def bottleneck_bank_options(command: Callable) -> Callable:
    """Add --bottleneck-sites, --bottleneck-size and --bottleneck-activations to `export`."""
    options = [
        click.option(
            "--bottleneck-sites",
            type=click.Choice(["all"]),
            default=None,
            help="Runtime mode: 'all' gives every layer's attention and feed-forward site "
            "bottleneck banks, so any adapter can be added later (default: the adapters' sites).",
        ),
        click.option(
            "--bottleneck-size",
            type=click.IntRange(min=1),
            default=None,
            help="Runtime mode: bottleneck bank width (default: the widest adapter).",
        ),
        click.option(
            "--bottleneck-activations",
            default=None,
            help="Runtime mode: non-linearities the graph computes, comma-separated "
            "(default: the adapters' own).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command
