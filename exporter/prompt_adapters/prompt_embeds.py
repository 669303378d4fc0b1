"""Prompt tuning, P-tuning and CPT: `prompt_embeds` placed in front of the token embeddings."""

from __future__ import annotations

import torch
from torch import nn

from peft_export.bundle import names
from peft_export.bundle.manifest import AdapterLayout
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.prompt_adapters.convert import PROMPT_EMBEDS_METHODS

TRACE_PROMPT_LEN = 5
"""Differs from the wrapper's trace batch/seq/past sizes so dynamo keeps the dims apart."""


class PromptEmbedsExtension(GraphExtension):
    """Input `prompt_embeds` [batch, prompt_len, hidden]; prompt_len may be 0 (decode).

    `methods` are what the manifest records as accepted (encoders leave out CPT, which PEFT
    has for causal LMs only).
    """

    def __init__(
        self,
        hidden_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        methods: tuple[str, ...] = PROMPT_EMBEDS_METHODS,
    ) -> None:
        self.hidden_size = hidden_size
        self.max_len = max_len
        self.dtype = dtype
        self.methods = methods

    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        gen = torch.Generator().manual_seed(1)
        example = torch.randn(batch, TRACE_PROMPT_LEN, self.hidden_size, generator=gen)
        dims = ("batch", "prompt_len", self.hidden_size)
        return [ExtraInput(names.PROMPT_EMBEDS, dims, example.to(self.dtype))]

    def install(self, model: nn.Module) -> None:
        return None

    def embed(self, embeds: torch.Tensor, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([feeds[names.PROMPT_EMBEDS].to(embeds.dtype), embeds], dim=1)

    def describe(self, layout: AdapterLayout) -> None:
        layout.prompt_max_len = self.max_len
        for method in self.methods:
            if method not in layout.methods:
                layout.methods.append(method)
