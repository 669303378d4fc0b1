"""The token-bank GraphExtension: per-slot embedding rows and output-head deltas.

Per row b with s = adapter_ids[b] (the LoRA banks' slot ids, so one slot holds an adapter's
LoRA and token parts together):

    k          = embed_index[s, input_ids[b, t]]
    embeds     = k > 0 ? embed_rows[s, k - 1] : E[input_ids[b, t]]
    logits     = h W^T + MultiLoRA(h, head_A, head_B, adapter_ids)

The graph's vocabulary is the base's plus `extra_tokens` rows, zero in E and W, so an adapter
that adds tokens fills them through its slot and every other row never samples them (the
runtime limits each row to its adapter's vocabulary). Costs two Gathers and a Where on the
embedding, and one MultiLoRA on the head ([batch, seq, head_rank] then [.., vocab]).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from peft_export.bundle import names
from peft_export.bundle import token_inputs as tk
from peft_export.bundle.manifest import AdapterLayout, TokenLayout
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.runtime_adapters import multilora_op
from peft_export.exporter.runtime_adapters.banks import TRACE_SLOTS


class TokenBanks(GraphExtension):
    """Token-bank inputs for `layout`; needs the LoRA banks' `adapter_ids` in the graph."""

    def __init__(self, layout: TokenLayout, hidden: int, dtype: torch.dtype) -> None:
        self.layout = layout
        self.hidden = hidden
        self.dtype = dtype
        self.vocab = layout.base_vocab + layout.extra_tokens
        self._feeds: dict[str, torch.Tensor] = {}

    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        gen = torch.Generator().manual_seed(3)
        rows, rank = self.layout.embed_rows, self.layout.head_rank
        index = torch.randint(0, rows + 1, (TRACE_SLOTS, self.vocab), generator=gen)
        shapes = {
            tk.EMBED_ROWS: (rows, self.hidden),
            tk.HEAD_A: (rank, self.hidden),
            tk.HEAD_B: (self.vocab, rank),
        }
        extra = [ExtraInput(tk.EMBED_INDEX, ("slots", self.vocab), index)]
        for name, shape in shapes.items():
            example = 0.1 * torch.randn((TRACE_SLOTS, *shape), generator=gen)
            extra.append(ExtraInput(name, ("slots", *shape), example.to(self.dtype)))
        return extra

    def install(self, model: nn.Module) -> None:
        if self.layout.extra_tokens:
            model.resize_token_embeddings(self.vocab, mean_resizing=False)
            with torch.no_grad():
                model.get_input_embeddings().weight[self.layout.base_vocab :] = 0
                model.get_output_embeddings().weight[self.layout.base_vocab :] = 0
        head = model.get_submodule(self.layout.head_path)
        head.forward = functools.partial(self._head, head)

    def bind(self, feeds: dict[str, torch.Tensor]) -> None:
        self._feeds = feeds

    def embed(self, embeds: torch.Tensor, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, slots = feeds[names.INPUT_IDS], feeds[names.ADAPTER_IDS].unsqueeze(1)
        index, rows = feeds[tk.EMBED_INDEX], feeds[tk.EMBED_ROWS]
        pick = index.reshape(-1)[slots * index.shape[1] + ids]
        flat_rows = rows.reshape(-1, rows.shape[-1])
        row = flat_rows[slots * rows.shape[1] + (pick - 1).clamp(min=0)]
        return torch.where((pick > 0).unsqueeze(-1), row.to(embeds.dtype), embeds)

    def _head(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        feeds = self._feeds
        delta = multilora_op.multi_lora(
            x, feeds[tk.HEAD_A], feeds[tk.HEAD_B], feeds[names.ADAPTER_IDS]
        )
        return F.linear(x, module.weight) + delta

    def onnx_translations(self) -> dict:
        return dict(multilora_op.TRANSLATION_TABLE)

    def finalize_onnx(self, model) -> None:  # noqa: ANN001 - onnx.ModelProto
        multilora_op.add_function(model)

    def describe(self, layout: AdapterLayout) -> None:
        layout.tokens = self.layout
        if tk.TRAINABLE_TOKENS not in layout.methods:
            layout.methods.append(tk.TRAINABLE_TOKENS)
