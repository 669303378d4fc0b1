"""LongRoPE (Phi-3.5, Phi-4-mini) with the short/long factor chosen per row, not per batch.

HF picks the long factors for a whole forward call when any position in the batch passes
`original_max_position_embeddings`, so a short row batched with a long one would change. This
module picks per row, from that row's own largest position, which is what the row computes
alone (the PyTorch reference). Like HF's cached generate, keys already in the cache keep the
factors they were computed with.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class RowLongRope(nn.Module):
    """forward(x, position_ids) -> (cos, sin), the contract of HF's rotary modules."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        config = rotary.config
        self.original = int(config.rope_parameters["original_max_position_embeddings"])
        short = rotary.original_inv_freq.detach().clone().float()
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, short.device, seq_len=self.original + 1)
        self.register_buffer("short_inv_freq", short, persistent=False)
        self.register_buffer("long_inv_freq", long.float(), persistent=False)
        self.attention_scaling = float(rotary.attention_scaling)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        longest = position_ids.max(dim=-1, keepdim=True).values + 1
        use_long = (longest > self.original)[..., None]
        inv_freq = torch.where(use_long, self.long_inv_freq, self.short_inv_freq)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def install_row_longrope(model: nn.Module) -> int:
    """Swap every LongRoPE rotary module of `model` for RowLongRope; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if getattr(module, "rope_type", None) != "longrope" or isinstance(module, RowLongRope):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RowLongRope(module))
        swapped += 1
    return swapped
