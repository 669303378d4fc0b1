"""The input provider that feeds bank inputs and `adapter_ids` from an AdapterStore.

Rows naming a LoRA-family, trainable-tokens or bottleneck adapter get its slot; rows with no
adapter, or with an adapter another provider serves (prompt-side methods), get slot 0, the
base model. Graphs with token banks or activated LoRA also get each row's vocabulary and
`alora_start` (runtime/slot_rows.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from peft_export.bundle import names, token_inputs
from peft_export.runtime.adapter_store import SLOT_METHODS, AdapterStore, bank_specs
from peft_export.runtime.backends.base import TensorView
from peft_export.runtime.providers import InputProvider, RequestContext, StepState
from peft_export.runtime.slot_rows import row_facts

if TYPE_CHECKING:
    from peft_export.runtime.session import Bundle


class LoraBankProvider(InputProvider):
    accepts_adapters = True

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def inputs(self) -> set[str]:
        alora = [token_inputs.ALORA_START] if self.store.manifest.adapters.alora else []
        return {*self.store.specs, names.ADAPTER_IDS, *alora}

    def owns(self, name: str) -> bool:
        return self.store.owns(name)

    def start(self, ctx: RequestContext) -> None:
        rows = [a if a is not None and self.store.owns(a) else None for a in ctx.request.adapters]
        ctx.state[self] = self.store.acquire(rows)
        facts = row_facts(self.store.manifest, self.store, rows, ctx.prompt_ids)
        ctx.vocab_limits = facts.vocab
        ctx.state[(self, token_inputs.ALORA_START)] = facts.alora_start

    def step(self, ctx: RequestContext, state: StepState) -> None:
        state.feeds[names.ADAPTER_IDS] = np.ascontiguousarray(ctx.state[self].ids)
        start = ctx.state.get((self, token_inputs.ALORA_START))
        if start is not None:
            state.feeds[token_inputs.ALORA_START] = start

    def fixed_feeds(self) -> dict[str, TensorView]:
        return self.store.feeds()

    def finish(self, ctx: RequestContext) -> None:
        ctx.state.pop((self, token_inputs.ALORA_START), None)
        lease = ctx.state.pop(self, None)
        if lease is not None:
            self.store.release(lease)


def provider_for_bundle(bundle: Bundle) -> LoraBankProvider | None:
    """PROVIDER_FACTORIES entry: a provider when the graph has LoRA or bottleneck banks."""
    manifest = bundle.manifest
    if manifest.mode != "runtime" or not bank_specs(manifest):
        return None
    if not any(m in SLOT_METHODS for m in manifest.adapters.methods):
        return None
    return LoraBankProvider(AdapterStore(bundle.root, manifest))
