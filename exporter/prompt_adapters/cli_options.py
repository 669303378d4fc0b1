"""Export-command options of prompt-side runtime inputs (light: imported when the CLI starts)."""

from __future__ import annotations

from collections.abc import Callable

import click


def prompt_input_options(command: Callable) -> Callable:
    """Add --prefix-max-len, --prompt-max-len and --adaption-max-len to `export`."""
    options = [
        click.option(
            "--prefix-max-len",
            type=click.IntRange(min=1),
            default=None,
            help="Runtime mode: longest prefix-tuning prefix the bundle accepts "
            "(default: the longest given prefix adapter; none given: no prefix support).",
        ),
        click.option(
            "--prompt-max-len",
            type=click.IntRange(min=1),
            default=None,
            help="Runtime mode: longest prompt-tuning / P-tuning prompt; adds the "
            "prompt_embeds input (default: the longest given prompt adapter).",
        ),
        click.option(
            "--adaption-max-len",
            type=click.IntRange(min=1),
            default=None,
            help="Runtime mode, Llama-family bases: longest AdaptionPrompt (LLaMA-Adapter) "
            "prompt; adds its per-layer inputs (default: the longest given one).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command
