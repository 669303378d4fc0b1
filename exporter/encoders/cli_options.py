"""Export-command option of encoder bundles (light: imported when the CLI starts)."""

from __future__ import annotations

from collections.abc import Callable

import click

TASK_CHOICES = (
    "sequence-classification",
    "token-classification",
    "question-answering",
    "feature-extraction",
)


def encoder_options(command: Callable) -> Callable:
    """Add --task to `export` (encoders only; default: the adapters' PEFT task_type)."""
    return click.option(
        "--task",
        type=click.Choice(TASK_CHOICES),
        default=None,
        help="Encoder bases: the task the graph computes (default: the adapters' PEFT "
        "task_type, else the checkpoint's head, else feature-extraction).",
    )(command)
