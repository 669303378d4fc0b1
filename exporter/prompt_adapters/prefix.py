"""Prefix tuning needs no graph input: the prefix enters as past KV on the first step."""

from __future__ import annotations

from torch import nn

from peft_export.bundle.manifest import AdapterLayout
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.prompt_adapters.convert import PREFIX_TUNING


class PrefixExtension(GraphExtension):
    """Declares prefix support in the manifest; the graph's past inputs already carry it."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len

    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        return []

    def install(self, model: nn.Module) -> None:
        return None

    def describe(self, layout: AdapterLayout) -> None:
        layout.prefix_max_len = self.max_len
        if PREFIX_TUNING not in layout.methods:
            layout.methods.append(PREFIX_TUNING)
