"""Shared helpers of the prompt-side tests: PEFT references and runtime runs with logits.

The reference is PEFT's forward on the whole sequence (no cache), never its generate(),
which drops prefixes and diverges for prompt tuning (docs/known-issues.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peft_export.bundle import names

NEW_TOKENS = 16
TOLERANCE = 1e-4


def peft_model(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of the text positions (virtual tokens dropped)."""
    tensor = torch.tensor([ids])
    logits = model(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits
    return logits[0, -len(ids) :].float().numpy()


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens from PEFT's forward over the whole sequence at every step."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(reference_logits(model, seq)[-1].argmax()))
    return seq[len(ids) :]


@dataclass
class RowRun:
    tokens: list[int]
    logits: np.ndarray
    """[prompt_len + n - 1, vocab]: the prompt's text positions, then one per decode step."""


def run_rows(
    bundle, prompts: list[list[int]], adapters: list[str | None], n: int = NEW_TOKENS
) -> list[RowRun]:
    """Greedy-generate through the runtime and capture every step's logits per row."""
    steps: list[np.ndarray] = []
    backend = bundle.backend
    original = backend.run

    def capture(binding, feeds, outputs, kv=None):
        original(binding, feeds, outputs, kv)
        text_len = feeds[names.INPUT_IDS].shape[1]
        steps.append(outputs[names.LOGITS].numpy()[:, -text_len:].copy())

    backend.run = capture
    try:
        result = bundle.generate(
            prompts, adapters=adapters, max_new_tokens=n, ignore_eos=True, chat_template=False
        )
    finally:
        del backend.run
    prefill = np.concatenate(steps[: len(steps) - (n - 1)], axis=1)
    rows = []
    for b, ids in enumerate(prompts):
        logits = [prefill[b, -len(ids) :]] + [s[b, -1:] for s in steps[len(steps) - (n - 1) :]]
        rows.append(RowRun(result.rows[b].token_ids, np.concatenate(logits)))
    return rows


def check_row(run: RowRun, model: torch.nn.Module, ids: list[int]) -> None:
    """Tokens equal the PEFT greedy loop; logits (prefill and decode) within TOLERANCE."""
    expected = reference_greedy(model, ids, len(run.tokens))
    assert run.tokens == expected
    reference = reference_logits(model, ids + run.tokens[:-1])
    err = float(np.abs(run.logits - reference).max())
    assert err <= TOLERANCE, f"max abs logits error {err:.3g}"
