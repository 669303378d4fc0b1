"""Planning the token banks and activated LoRA inside the LoRA-bank plan (planner.py).

Both share the LoRA banks' slots and `adapter_ids`, and an adapter's LoRA and token parts go
to one adapter file, so they are planned together with the banks rather than as a plan of
their own. Options (export flags): `extra_tokens`, `token_rows`, `head_rank` (default: what
the given adapters need) and `alora` (default: on when an adapter is an activated LoRA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peft_export.bundle import token_inputs as tk
from peft_export.exporter.adapter_source import AdapterSource
from peft_export.exporter.errors import ExportError
from peft_export.exporter.pipeline import ExportContext
from peft_export.exporter.runtime_adapters.convert import SlotTensors
from peft_export.exporter.runtime_adapters.token_banks import TokenBanks
from peft_export.exporter.runtime_adapters.tokens import (
    TokenBase,
    alora_tokens,
    convert_tokens,
    fill_slot,
    has_token_parts,
    token_layout,
)

OPTION_KEYS = ("extra_tokens", "token_rows", "head_rank", "alora")


@dataclass
class TokenPlan:
    extension: TokenBanks
    base: TokenBase
    token_only: list[SlotTensors]
    """Slots of adapters with no LoRA part (TRAINABLE_TOKENS adapters)."""

    def write_base(self, stage: Path) -> None:
        self.base.write(stage)


def wants_alora(context: ExportContext, sources: Sequence[AdapterSource]) -> bool:
    return bool(context.options.get("alora")) or any(alora_tokens(s) for s in sources)


def plan_tokens(
    context: ExportContext, sources: Sequence[AdapterSource], converted: Sequence[SlotTensors]
) -> TokenPlan | None:
    """Token banks for the adapters that need them (or the bounds asked); fills their slots."""
    token_sources = [s for s in sources if s.method in tk.TOKEN_METHODS or has_token_parts(s)]
    asked = any(context.options.get(k) for k in ("extra_tokens", "token_rows", "head_rank"))
    if not token_sources and not asked:
        return None
    if context.quantized is not None:
        raise ExportError(
            "token banks (trainable tokens, retrained heads) are not combined with --quantize "
            "yet; export them unquantized, or merge the adapter (--mode merged)"
        )
    base = TokenBase.from_model(context.model)
    layout = token_layout(base, [convert_tokens(s, base) for s in token_sources], context.options)
    by_name = {slot.name: slot for slot in converted}
    token_only = []
    for source in token_sources:
        slot = by_name.get(source.name)
        if slot is None:
            slot = SlotTensors(source.name, source.method, 0, str(source.path))
            token_only.append(slot)
        fill_slot(slot, source, base, layout)
    extension = TokenBanks(layout, base.hidden, context.dtype)
    return TokenPlan(extension, base, token_only)
