"""Names and constants of the trainable-token and activated-LoRA graph inputs
(docs/bundle-format.md, "Trainable tokens and retrained heads" and "Activated LoRA").

Both ride on the LoRA banks' slots: the token banks are selected by the same `adapter_ids`, so
an adapter that adds tokens or retrains the output head is one slot like any LoRA adapter,
and one batch mixes them. `alora_start` is per row, not per slot: where a row's aLoRA delta
starts depends on its own token history.
"""

from __future__ import annotations

EMBED_INDEX = "tokens.embed_index"
"""[slots, vocab] int64: 0 keeps the base embedding row of a token, k > 0 takes row k - 1 of
`tokens.embed_rows` for that slot."""
EMBED_ROWS = "tokens.embed_rows"
"""[slots, embed_rows, hidden]: the overriding embedding rows of each slot."""
HEAD_A = "tokens.head_A"
"""[slots, head_rank, hidden]: output-head delta, logits += MultiLoRA(h, head_A, head_B)."""
HEAD_B = "tokens.head_B"
"""[slots, vocab, head_rank]."""
TOKEN_BANKS = (EMBED_INDEX, EMBED_ROWS, HEAD_A, HEAD_B)
INT_BANKS = (EMBED_INDEX,)
"""Token banks holding int64 (the others hold the model dtype)."""

ALORA_START = "alora_start"
"""[batch] int64: the first position (as in position_ids) that gets the row's LoRA delta."""
NEVER = 1 << 62
"""`alora_start` of an aLoRA row whose invocation sequence is not (yet) in its tokens."""

TRAINABLE_TOKENS = "trainable_tokens"
"""Method name of PEFT's TRAINABLE_TOKENS adapters in manifests and adapter files."""
TOKEN_METHODS = (TRAINABLE_TOKENS,)


def is_token_bank(name: str) -> bool:
    return name in TOKEN_BANKS


def bank_fill(name: str) -> float:
    """Slot-0 (base model) value of a token bank: no override, no delta."""
    return 0.0
