"""Per-row facts of slot adapters that the loop needs besides their slot id (numpy only).

- vocabulary: an adapter that adds tokens owns the graph's extra vocabulary rows; every
  other row samples only from the base's tokens, and may not feed the added ids;
- activation: an activated LoRA (PEFT's `alora_invocation_tokens`) applies from the start of
  the last occurrence of its invocation sequence in the row's tokens, as PEFT finds it
  (`alora_start`, docs/bundle-format.md); other rows start at 0 (always on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from peft_export.bundle import token_inputs
from peft_export.runtime.errors import InferenceError

if TYPE_CHECKING:
    from peft_export.bundle.manifest import Manifest
    from peft_export.runtime.adapter_store import AdapterStore


@dataclass(frozen=True)
class RowFacts:
    vocab: list[int] | None
    """Tokens each row may feed and sample (None: the whole graph vocabulary)."""
    alora_start: np.ndarray | None
    """[batch] int64 for graphs with `alora_start`, else None."""


def invocation_start(tokens: Sequence[int], invocation: Sequence[int]) -> int | None:
    """Index where the last occurrence of `invocation` starts in `tokens`, or None."""
    n = len(invocation)
    if n == 0:
        return 0
    for start in range(len(tokens) - n, -1, -1):
        if list(tokens[start : start + n]) == list(invocation):
            return start
    return None


def row_facts(
    manifest: Manifest,
    store: AdapterStore,
    adapters: Sequence[str | None],
    prompt_ids: Sequence[Sequence[int]],
) -> RowFacts:
    """Vocabulary and activation start of each row; refuses token ids a row does not have."""
    entries = [None if a is None else store.entry(a) for a in adapters]
    vocab = None
    tokens = manifest.adapters.tokens
    if tokens is not None:
        vocab = [
            e.vocab_size if e is not None and e.vocab_size else tokens.base_vocab for e in entries
        ]
        for row, (ids, limit) in enumerate(zip(prompt_ids, vocab, strict=True)):
            if any(t >= limit for t in ids):
                raise InferenceError(
                    f"prompt {row} has token ids >= {limit}, which only an adapter that adds "
                    "tokens defines; give the row that adapter, or drop those ids"
                )
    start = None
    if manifest.adapters.alora:
        start = np.zeros(len(adapters), dtype=np.int64)
        for row, (entry, ids) in enumerate(zip(entries, prompt_ids, strict=True)):
            if entry is not None and entry.alora_invocation_tokens:
                found = invocation_start(ids, entry.alora_invocation_tokens)
                start[row] = token_inputs.NEVER if found is None else found
    return RowFacts(vocab, start)
