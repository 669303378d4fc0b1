"""Requests and results of the generation loop.

A request carries everything one `generate` call needs (prompts, per-row options, adapter
names), so the loop keeps no state between calls and several requests may run at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from peft_export.runtime.errors import InferenceError

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
"""Text (a user turn, through the chat template unless disabled), a conversation as chat
messages ({"role": ..., "content": ...}, always through the template), or token ids."""


@dataclass(frozen=True)
class SamplingOptions:
    """How one row picks its next token. temperature 0 (the default) is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p; 1.0 keeps all."""
    seed: int | None = None
    """Seed of this row's random stream; None draws fresh entropy."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the row, besides the bundle's EOS tokens."""
    stop_strings: tuple[str, ...] = ()
    """Texts that end the row; the returned text is cut before the first one."""
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise InferenceError("max_new_tokens must be 0 or more; pass a non-negative count")
        if self.temperature < 0:
            raise InferenceError("temperature must be >= 0 (0 is greedy); pass e.g. 0.7")
        if self.top_k < 0:
            raise InferenceError("top_k must be >= 0 (0 keeps all tokens); pass e.g. 50")
        if not 0.0 < self.top_p <= 1.0:
            raise InferenceError("top_p must be in (0, 1]; pass e.g. 0.9 (1.0 keeps all tokens)")
        if any(not s for s in self.stop_strings):
            raise InferenceError("stop strings must not be empty; remove the empty one")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one row, as the streaming callback receives it."""

    row: int
    token_id: int
    text: str
    """Newly decodable text of the row (may be empty while a multi-byte character is open)."""
    finished: bool
    """True on the row's last token."""
    logits: np.ndarray | None = None
    """The row's logits the token was chosen from ([vocab]); a view valid only during the
    callback (the buffer is reused on the next step): copy it to keep it. `verify` uses it."""


StreamCallback = Callable[[TokenEvent], None]


@dataclass
class GenerationRequest:
    """One batch: a prompt per row, with its options and adapter.

    `adapters[i]` names the runtime adapter of row i (None: the base model, or the merged
    adapter of a merged bundle); it is read by the adapter input provider, not by the loop.
    """

    prompts: list[Prompt]
    options: list[SamplingOptions] = field(default_factory=list)
    adapters: list[str | None] = field(default_factory=list)
    chat_template: bool = True
    """Render text prompts through the bundle's chat template when it has one."""
    system_prompt: str | None = None
    stream: StreamCallback | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise InferenceError("a request needs at least one prompt")
        rows = len(self.prompts)
        if not self.options:
            self.options = [SamplingOptions()] * rows
        if len(self.options) == 1 and rows > 1:
            self.options = list(self.options) * rows
        if not self.adapters:
            self.adapters = [None] * rows
        if len(self.adapters) == 1 and rows > 1:
            self.adapters = list(self.adapters) * rows
        if len(self.options) != rows or len(self.adapters) != rows:
            raise InferenceError(
                f"{rows} prompts but {len(self.options)} options and {len(self.adapters)} "
                "adapters; give one per prompt (or one for all)"
            )

    @property
    def batch(self) -> int:
        return len(self.prompts)


@dataclass
class RowResult:
    prompt_ids: list[int]
    token_ids: list[int]
    """Generated tokens, including the EOS or stop token that ended the row."""
    text: str
    """Decoded generated text, special tokens skipped, cut before a stop string."""
    finish_reason: str
    """"eos", "stop_token", "stop_string" or "length"."""


@dataclass
class GenerationResult:
    rows: list[RowResult]
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0

    @property
    def texts(self) -> list[str]:
        return [row.text for row in self.rows]

    @property
    def token_ids(self) -> list[list[int]]:
        return [row.token_ids for row in self.rows]

    @property
    def new_tokens(self) -> int:
        return sum(len(row.token_ids) for row in self.rows)
