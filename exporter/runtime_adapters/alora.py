"""Activated LoRA (PEFT's `alora_invocation_tokens`): the LoRA delta from a position on.

PEFT applies an aLoRA adapter's delta only to the tokens from the start of the last
occurrence of its invocation sequence. The graph takes that start per row as `alora_start`
(in position_ids' numbering, which counts only the row's real tokens), so

    gate[b, t] = position_ids[b, t] >= alora_start[b]

multiplies each LoRA delta. Positions before the start compute exactly the base model, so a
row that ran on the base model keeps its KV cache when it switches to the adapter. Rows of
ordinary adapters feed 0 (always on); an aLoRA row whose invocation is absent feeds a start no
position reaches (bundle/token_inputs.py NEVER).
"""

from __future__ import annotations

import torch

from peft_export.bundle import names
from peft_export.bundle import token_inputs as tk
from peft_export.exporter.graph.extension import ExtraInput


def start_input(batch: int, seq: int) -> ExtraInput:
    """`alora_start` [batch] with a trace example that cuts through the traced positions."""
    example = torch.tensor([(5 + i) % (seq + 5) for i in range(batch)], dtype=torch.int64)
    return ExtraInput(tk.ALORA_START, ("batch",), example)


def gate(feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, positions, 1] booleans: which positions get their row's LoRA delta."""
    start = feeds[tk.ALORA_START].unsqueeze(1)
    return (feeds[names.POSITION_IDS] >= start).unsqueeze(-1)
