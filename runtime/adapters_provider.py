"""The input provider that feeds bank inputs and `adapter_ids` from an AdapterStore.

Rows naming a LoRA-family or bottleneck adapter get its slot; rows with no adapter, or with an
adapter another provider serves (prompt-side methods), get slot 0, the base model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from peft_export.bundle import names
from peft_export.runtime.adapter_store import BANK_METHODS, AdapterStore, bank_specs
from peft_export.runtime.backends.base import TensorView
from peft_export.runtime.providers import InputProvider, RequestContext, StepState

if TYPE_CHECKING:
    from peft_export.runtime.session import Bundle


class LoraBankProvider(InputProvider):
    accepts_adapters = True

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    def inputs(self) -> set[str]:
        return {*self.store.specs, names.ADAPTER_IDS}

    def owns(self, name: str) -> bool:
        return self.store.owns(name)

    def start(self, ctx: RequestContext) -> None:
        rows = [a if a is not None and self.store.owns(a) else None for a in ctx.request.adapters]
        ctx.state[self] = self.store.acquire(rows)

    def step(self, ctx: RequestContext, state: StepState) -> None:
        state.feeds[names.ADAPTER_IDS] = np.ascontiguousarray(ctx.state[self].ids)

    def fixed_feeds(self) -> dict[str, TensorView]:
        return self.store.feeds()

    def finish(self, ctx: RequestContext) -> None:
        lease = ctx.state.pop(self, None)
        if lease is not None:
            self.store.release(lease)


def provider_for_bundle(bundle: Bundle) -> LoraBankProvider | None:
    """PROVIDER_FACTORIES entry: a provider when the graph has LoRA or bottleneck banks."""
    manifest = bundle.manifest
    if manifest.mode != "runtime" or not bank_specs(manifest):
        return None
    if not any(m in BANK_METHODS for m in manifest.adapters.methods):
        return None
    return LoraBankProvider(AdapterStore(bundle.root, manifest))
