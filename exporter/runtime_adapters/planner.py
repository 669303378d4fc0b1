"""The pipeline planner for runtime-mode LoRA-family adapters (exporter.pipeline.Planner).

Options it reads from `ExportContext.options` (the export command's flags):
`target_modules` (list of module names or paths; default: the adapters' modules),
`max_rank` (default: the largest adapter rank), `slots` (default 8, slot 0 = base model),
`methods` (which methods' inputs the graph gets; default: the whole LoRA family, so any
of them can be added later without a re-export), and the token-bank and activated-LoRA
options of token_plan.py.
"""

from __future__ import annotations

from pathlib import Path

from peft_export.bundle.lora_methods import LORA_METHODS, needs_base_weights
from peft_export.bundle.manifest import AdapterLayout
from peft_export.bundle.token_inputs import TOKEN_METHODS
from peft_export.exporter.pipeline import ExportContext, RuntimePlan
from peft_export.exporter.runtime_adapters.banks import LoraBanks
from peft_export.exporter.runtime_adapters.bundle_adapters import (
    base_target_weights,
    install_all,
    plan_layout,
    write_base_targets,
)
from peft_export.exporter.runtime_adapters.token_plan import plan_tokens, wants_alora

DEFAULT_SLOTS = 8
OPTION_KEYS = ("target_modules", "max_rank", "slots", "methods")
SLOT_METHODS = LORA_METHODS + TOKEN_METHODS


def plan_lora_banks(context: ExportContext) -> RuntimePlan | None:
    """Bank inputs for the LoRA-family adapters given (or for the methods asked)."""
    options = context.options
    sources = [s for s in context.sources if s.method in SLOT_METHODS]
    methods = _listed(options.get("methods"))
    if not sources and not methods:
        return None
    layout, parts, converted = plan_layout(
        context.model,
        sources,
        target_modules=_listed(options.get("target_modules")),
        max_rank=options.get("max_rank"),
        slots=int(options.get("slots") or DEFAULT_SLOTS),
        methods=methods,
    )
    banks = LoraBanks(
        layout.modules,
        r_max=layout.r_max,
        slots=layout.slots,
        methods=layout.methods,
        parts=parts,
        dtype=context.dtype,
        activated=wants_alora(context, sources),
    )
    tokens = plan_tokens(context, sources, converted)
    extensions = [banks] if tokens is None else [banks, tokens.extension]
    if tokens is not None:
        converted = [*converted, *tokens.token_only]
    # Quantized layers' base weights are read back from the graph when an adapter that reads
    # them (DoRA, OFT, ...) is added.
    quantized = context.quantized.blocks if context.quantized is not None else {}
    unquantized = [m for m in layout.modules if m.path not in quantized]
    weights = (
        base_target_weights(context.model, unquantized)
        if needs_base_weights(layout.methods) and unquantized
        else None
    )

    def write_adapters(stage: Path, manifest_layout: AdapterLayout) -> None:
        if weights is not None:
            write_base_targets(stage, weights)
        if tokens is not None:
            tokens.write_base(stage)
        install_all(stage, manifest_layout, converted, context)

    return RuntimePlan(methods=SLOT_METHODS, extensions=extensions, write_adapters=write_adapters)


def _listed(value: object) -> list[str] | None:
    """Accept a list or a comma-separated string (CLI); None or empty means 'default'."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip()]
    return items or None
