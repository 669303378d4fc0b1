"""Export-command options of runtime-mode LoRA banks (light: imported when the CLI starts)."""

from __future__ import annotations

from collections.abc import Callable

import click


def lora_bank_options(command: Callable) -> Callable:
    """Add --target-modules, --max-rank, --slots, --methods and the token-bank and aLoRA
    options to `export`."""
    options = [
        click.option(
            "--target-modules",
            default=None,
            help="Runtime mode: modules that get LoRA banks, comma-separated names or paths "
            "(default: those the adapters target).",
        ),
        click.option(
            "--max-rank",
            type=click.IntRange(min=1),
            default=None,
            help="Runtime mode: bank rank r_max (default: the largest adapter rank).",
        ),
        click.option(
            "--slots",
            type=click.IntRange(min=2),
            default=None,
            help="Runtime mode: bank slots including slot 0, the base model (default 8).",
        ),
        click.option(
            "--methods",
            default=None,
            help="Runtime mode: LoRA-family methods the slots accept, comma-separated "
            "(default: all; lora, rslora, adalora, loha and lokr are always accepted, "
            "dora and ia3 add scale inputs).",
        ),
        click.option(
            "--extra-tokens",
            type=click.IntRange(min=0),
            default=None,
            help="Runtime mode: vocabulary rows beyond the base's, for adapters that add tokens "
            "(default: what the given adapters add).",
        ),
        click.option(
            "--token-rows",
            type=click.IntRange(min=1),
            default=None,
            help="Runtime mode: embedding rows one adapter may override (trainable tokens; "
            "default: the most a given adapter overrides).",
        ),
        click.option(
            "--head-rank",
            type=click.IntRange(min=1),
            default=None,
            help="Runtime mode: rank of per-adapter output-head deltas (a retrained lm_head "
            "needs min(changed rows, hidden); default: what the given adapters need).",
        ),
        click.option(
            "--alora",
            is_flag=True,
            default=False,
            help="Runtime mode: serve activated LoRA adapters (alora_invocation_tokens; on "
            "by default when an exported adapter is one).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def norm_bank_options(command: Callable) -> Callable:
    """Add --norm-targets (LN-tuning norm banks) to `export`."""
    return click.option(
        "--norm-targets",
        default=None,
        help="Runtime mode: norm layers that get LN-tuning banks, comma-separated names or "
        "paths, or 'all' (default: those the LN-tuning adapters tune).",
    )(command)
