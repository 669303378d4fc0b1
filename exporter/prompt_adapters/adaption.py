"""AdaptionPrompt (LLaMA-Adapter) as graph inputs: per-row adapter keys, values and gates.

Mirrors PEFT's `AdaptedAttention.forward`: the attention's output gains
`o_proj(gate * softmax(q k_a^T / sqrt(d)) v_a)`, with q the layer's rotary queries and
(k_a, v_a) the layer's k/v projections of the adapter prompt, which conversion precomputed.
GPT-2 follows `AdaptedAttentionGPT`: q from the fused c_attn, no rotary, no output projection.
The gate and keys are inputs, so adapters swap without re-export and rows of one batch
may use different adapters (or none: gate 0); `adaption_mask` hides pad columns.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from peft_export.bundle import names
from peft_export.bundle.manifest import AdapterLayout
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.prompt_adapters.convert import ADAPTION_ARCHITECTURES, ADAPTION_PROMPT
from peft_export.models.architectures import get_arch

TRACE_ADAPTION_LEN = 6
"""Differs from the other trace sizes so dynamo keeps `adaption_len` its own dim."""

_ATTENTION = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(?:self_attn|attn)$")


class AdaptionExtension(GraphExtension):
    """Inputs for every layer (rows or layers without an adapter feed gate 0), hooked onto
    each attention module's output so the decoder code stays untouched."""

    def __init__(self, config: Any, max_len: int, dtype: torch.dtype = torch.float32) -> None:
        if config.model_type not in ADAPTION_ARCHITECTURES:
            raise ExportError(
                f"AdaptionPrompt is supported for {', '.join(ADAPTION_ARCHITECTURES)} bases, not "
                f"{config.model_type}; drop --adaption-max-len for this base"
            )
        spec = get_arch(config.model_type)
        self.gpt2 = config.model_type == "gpt2"
        self.num_layers = spec.num_layers(config)
        self.num_heads = spec.num_heads(config)
        self.num_kv_heads = spec.num_kv_heads(config)
        self.head_dim = spec.head_dim(config)
        self.max_len = max_len
        self.dtype = dtype
        self._feeds: dict[str, torch.Tensor] = {}

    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        gen = torch.Generator().manual_seed(2)
        length = TRACE_ADAPTION_LEN
        kv_shape = (batch, self.num_kv_heads, length, self.head_dim)
        kv_dims = ("batch", self.num_kv_heads, "adaption_len", self.head_dim)
        out = []
        for layer in range(self.num_layers):
            for name in (names.adaption_key(layer), names.adaption_value(layer)):
                example = torch.randn(kv_shape, generator=gen).to(self.dtype)
                out.append(ExtraInput(name, kv_dims, example))
            gate = torch.randn(batch, generator=gen).to(self.dtype)
            out.append(ExtraInput(names.adaption_gate(layer), ("batch",), gate))
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[0, 0] = 0
        out.append(ExtraInput(names.ADAPTION_MASK, ("batch", "adaption_len"), mask))
        return out

    def install(self, model: nn.Module) -> None:
        found = 0
        for path, module in model.named_modules():
            match = _ATTENTION.search(path)
            if match is None:
                continue
            if getattr(getattr(module, "o_proj", None), "bias", None) is not None:
                raise ExportError(
                    "AdaptionPrompt on a base whose o_proj has a bias is not supported (a row "
                    "without the adapter would gain the bias); export without --adaption-max-len"
                )
            module.register_forward_hook(self._hook(int(match.group(1))), with_kwargs=True)
            found += 1
        if found != self.num_layers:
            raise ExportError(
                f"found {found} attention modules (layers.N.self_attn or h.N.attn), expected "
                f"{self.num_layers}; AdaptionPrompt needs a Llama-family or GPT-2 layout"
            )

    def bind(self, feeds: dict[str, torch.Tensor]) -> None:
        self._feeds = feeds

    def describe(self, layout: AdapterLayout) -> None:
        layout.adaption_max_len = self.max_len
        if ADAPTION_PROMPT not in layout.methods:
            layout.methods.append(ADAPTION_PROMPT)

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            attn_output, *rest = output
            extra = self._adapter_output(module, layer, hidden, kwargs.get("position_embeddings"))
            return (attn_output + extra, *rest)

        return hook

    def _adapter_output(
        self,
        attn: nn.Module,
        layer: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        feeds = self._feeds
        batch, q_len, width = hidden.shape
        query = attn.c_attn(hidden)[..., :width] if self.gpt2 else attn.q_proj(hidden)
        query = query.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        if not self.gpt2:
            cos, sin = (t.unsqueeze(1) for t in position_embeddings)
            query = query * cos + _rotate_half(query) * sin
        dtype = query.dtype
        repeat = self.num_heads // self.num_kv_heads
        keys = feeds[names.adaption_key(layer)].to(dtype).repeat_interleave(repeat, dim=1)
        values = feeds[names.adaption_value(layer)].to(dtype).repeat_interleave(repeat, dim=1)
        scores = torch.matmul(query, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
        keep = feeds[names.ADAPTION_MASK][:, None, None, :] != 0
        scores = scores.float().masked_fill(~keep, torch.finfo(torch.float32).min)
        gate = feeds[names.adaption_gate(layer)].to(dtype)[:, None, None, None]
        weights = gate * torch.softmax(scores, dim=-1).to(dtype)
        out = torch.matmul(weights, values).transpose(1, 2).reshape(batch, q_len, -1)
        return out if self.gpt2 else attn.o_proj(out)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
