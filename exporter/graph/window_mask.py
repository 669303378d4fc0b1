"""Attention masks that measure causality and sliding windows in kept tokens, not cache columns.

The runtime left-pads rows (and their prefixes and prompts) inside one KV cache, so a row's
cache columns carry gaps. HF builds a sliding-window mask from column indices, which counts
those gaps: a padded row would see fewer real tokens than it sees alone. Here the distance
between a query and a key is the number of kept tokens between them (cumsum of
`attention_mask`), which is the same in a padded batch as for the row alone, and equals HF's
column distance whenever a row has no gaps (every reference PyTorch run).
"""

from __future__ import annotations

import torch

SLIDING = "sliding_attention"


def kept_token_masks(
    attention_mask: torch.Tensor,
    query_len: int,
    windows: dict[str, int | None],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Additive masks [batch, 1, query_len, past + query_len] per layer kind of `windows`.

    `attention_mask` is the graph's [batch, past + query_len] 0/1 input; a kind with window w
    lets a query see a key at most w - 1 kept tokens back (HF's sliding_window_overlay).
    """
    total = attention_mask.shape[1]
    past = total - query_len
    keep = attention_mask.to(torch.bool)
    count = attention_mask.to(torch.int64).cumsum(-1)
    # narrow / arange of query_len (not [past:]) keep the query dim's size symbolic for export
    query_count = count.narrow(1, past, query_len)
    columns = torch.arange(total, device=attention_mask.device)
    query_columns = torch.arange(query_len, device=attention_mask.device) + past
    causal = columns[None, :] <= query_columns[:, None]
    visible = keep[:, None, :] & causal[None]
    distance = query_count[:, :, None] - count[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    lowest = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    masks = {}
    for kind, window in windows.items():
        allowed = visible if window is None else visible & (distance < window)
        masks[kind] = torch.where(allowed, zero, lowest)[:, None]
    return masks
