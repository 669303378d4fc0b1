"""Adapters for scheduled rows: bundle files -> host cache -> bank slots, pinned per row.

A row's adapter is resolved when the row is admitted: a LoRA-family adapter pins one bank
slot (the store's LRU places it there, from its host LRU, from the file) until the row
leaves; a prompt-side adapter (prefix, prompt embeddings, LLaMA-Adapter) is held by the row
itself (the provider's host LRU may drop its own copy meanwhile). Admission never waits on a
slot: when every slot is pinned by other rows the request stays queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peft_export.bundle.lora_methods import LORA_METHODS
from peft_export.runtime.adapter_store import AdapterStore, Lease
from peft_export.runtime.adapters_provider import LoraBankProvider
from peft_export.runtime.errors import InferenceError, UnknownAdapterError
from peft_export.runtime.prompt_inputs import PromptAdapter, PromptInputProvider, is_prompt_method
from peft_export.runtime.scheduler import registry

if TYPE_CHECKING:
    from peft_export.runtime.session import Bundle


@dataclass
class RowAdapter:
    """What one row runs with: its bank slot (0 = base) and/or its prompt-side adapter."""

    name: str | None
    lease: Lease | None = None
    prompt: PromptAdapter | None = None

    @property
    def slot(self) -> int:
        return int(self.lease.ids[0]) if self.lease is not None else 0

    @property
    def extra_positions(self) -> int:
        """Positions the adapter adds in front of the text (prefix or prompt embeddings)."""
        if self.prompt is None or self.prompt.method == "adaption_prompt":
            return 0
        return self.prompt.length


class AdapterPager:
    """Resolves, pins and releases row adapters; the registry of the bundle's adapters."""

    def __init__(self, bundle: Bundle, host_cache_adapters: int) -> None:
        self.root = Path(bundle.root)
        self.store: AdapterStore | None = None
        self.prompts: PromptInputProvider | None = None
        for provider in bundle.input_providers:
            if isinstance(provider, LoraBankProvider):
                self.store = provider.store
            elif isinstance(provider, PromptInputProvider):
                self.prompts = provider
            elif provider.accepts_adapters:
                raise InferenceError(
                    f"the scheduler cannot serve adapters of {type(provider).__name__} (per "
                    "request, not per row); use Bundle.generate for this bundle"
                )
        if self.store is not None:
            self.store.host_capacity = host_cache_adapters
        if self.prompts is not None:
            self.prompts.capacity = host_cache_adapters

    # -- rows -------------------------------------------------------------------------

    def method_of(self, name: str) -> str:
        """The method of an adapter the bundle serves now (UnknownAdapterError otherwise)."""
        if self.store is not None and self.store.owns(name):
            return self.store.manifest.adapters.installed[name].method
        if self.prompts is not None and self.prompts.owns(name):
            return self.prompts.manifest.adapters.installed[name].method
        have = ", ".join(self.names()[:20]) or "none"
        raise UnknownAdapterError(
            f"unknown adapter {name!r} (this bundle serves: {have}); register it first"
        )

    def prompt_adapter(self, name: str) -> PromptAdapter:
        """A prompt-side adapter's tensors (host tier); read at submit to know its length."""
        assert self.prompts is not None
        return self.prompts.get(name)

    def try_pin(self, name: str | None, prompt: PromptAdapter | None) -> RowAdapter | None:
        """The row's adapter with its slot pinned, or None when no slot is free right now."""
        if name is None or prompt is not None:
            return RowAdapter(name, prompt=prompt)
        assert self.store is not None
        lease = self.store.try_acquire([name])
        return None if lease is None else RowAdapter(name, lease=lease)

    def release(self, adapter: RowAdapter) -> None:
        if adapter.lease is not None and self.store is not None:
            self.store.release(adapter.lease)
            adapter.lease = None

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        if self.store is not None:
            s = self.store.stats()
            out["host"] = {
                "hits": s["host_hits"],
                "misses": s["host_misses"],
                "evictions": s["host_evictions"],
                "size": s["host_size"],
            }
            out["slots"] = {
                "hits": s["slot_hits"],
                "misses": s["slot_misses"],
                "evictions": s["slot_evictions"],
                "size": s["slot_size"],
                "pinned": s["slots_pinned"],
                "capacity": self.store.slots - 1,
            }
        if self.prompts is not None:
            out["prompt_host"] = self.prompts.stats()
        return out

    # -- registry ---------------------------------------------------------------------

    def names(self) -> list[str]:
        served = set()
        if self.store is not None:
            installed = self.store.current_manifest().adapters.installed
            served |= {n for n, e in installed.items() if e.method in LORA_METHODS}
        if self.prompts is not None:
            self.prompts.owns("")  # re-reads a changed manifest
            installed = self.prompts.manifest.adapters.installed
            served |= {n for n, e in installed.items() if is_prompt_method(e.method)}
        return sorted(served)

    def register(self, files: dict[str, Path], *, replace: bool) -> dict[str, str]:
        accepted = set()
        if self.store is not None:
            accepted |= set(LORA_METHODS)
        if self.prompts is not None:
            accepted |= {m for m in self.prompts.manifest.adapters.methods if is_prompt_method(m)}
        return registry.install(
            self.root, files, replace=replace, accepted=accepted, store=self.store
        )

    def unregister(self, name: str) -> None:
        registry.uninstall(self.root, name)
        self.drop(name)

    def held(self) -> list[str]:
        held = set(self.store.held()) if self.store is not None else set()
        if self.prompts is not None:
            held |= set(self.prompts.held())
        return sorted(held)

    def load(self, name: str) -> None:
        method = self.method_of(name)
        if is_prompt_method(method):
            self.prompt_adapter(name)
        else:
            assert self.store is not None
            self.store.load(name)

    def drop(self, name: str) -> bool:
        dropped = self.store.drop(name) if self.store is not None else True
        if self.prompts is not None:
            self.prompts.drop(name)
        return dropped
