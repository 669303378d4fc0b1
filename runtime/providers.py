"""Input providers: how runtime adapters add their inputs to each step without touching the loop.

The loop owns the base inputs (input_ids, attention_mask, position_ids, the KV past). A
provider owns some other graph inputs (LoRA banks + `adapter_ids`, `prompt_embeds`, ...)
and may reserve room in front of the text:

- a *prefix* of past positions (prefix tuning): its KV enters as the past of the first step;
- a *prompt* of embedding positions (prompt tuning / P-tuning): `prompt_embeds` rows that the
  graph puts in front of the token embeddings.

The loop then builds the mask as [prefix | prompt | text] (each part per row, 0 where a row
has nothing there) and positions as cumsum(mask) - 1, which is how PEFT numbers them.

Providers are shared by concurrent requests: keep per-request state in `ctx.state`, never on
`self`. Providers that come with the runtime are listed in PROVIDER_FACTORIES as
"module:function" (function(bundle) -> InputProvider | None) and built when a bundle loads.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from peft_export.runtime.backends.base import Feed

if TYPE_CHECKING:
    from peft_export.runtime.request import GenerationRequest
    from peft_export.runtime.session import Bundle

PROVIDER_FACTORIES: tuple[str, ...] = (
    "peft_export.runtime.adapters_provider:provider_for_bundle",
    "peft_export.runtime.prompt_inputs:provider_for_bundle",
    "peft_export.runtime.refit_swap:provider_for_bundle",
)
"""Built-in providers, "module:function"; each returns a provider for a bundle, or None."""


@dataclass
class Reservation:
    """Room a provider asks for in front of the text, for the whole request.

    Masks are int64 [batch, length]: 1 where the row has a prefix/prompt entry there. Rows
    with shorter (or no) entries are left-padded with 0, like the text.
    """

    prefix_len: int = 0
    prefix_mask: np.ndarray | None = None
    prompt_len: int = 0
    prompt_mask: np.ndarray | None = None


@dataclass
class RequestContext:
    """What providers see of one request. `state` is free for providers (key by provider)."""

    request: GenerationRequest
    bundle: Bundle
    prompt_ids: list[list[int]]
    state: dict[Any, Any] = field(default_factory=dict)
    vocab_limits: list[int] | None = None
    """Tokens each row may sample (a provider sets it where rows differ: adapters that add
    tokens own the graph's extra vocabulary rows); None: every logit."""

    @property
    def batch(self) -> int:
        return len(self.prompt_ids)


@dataclass
class StepState:
    """One step's inputs, assembled by the loop before providers run.

    Providers add their feeds to `feeds` (host arrays or backend buffer views) and may
    adjust the mask and positions. On step 0 a prefix provider replaces the past feeds
    (`past_key_values.{i}.key|value`, [batch, kv_heads, prefix_len, head_dim]) with its KV.
    """

    index: int
    """0 for the first step (the only one that carries prefix past and prompt embeddings);
    long prompts take several prefill steps (seq > 1) before the one-token decode steps."""
    past_len: int
    """Positions already in the KV cache before this step (prefix included)."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    feeds: dict[str, Feed] = field(default_factory=dict)


class InputProvider(abc.ABC):
    """Feeds some graph inputs on every step of every request."""

    accepts_adapters: bool = False
    """True when this provider resolves `request.adapters` names (runtime-mode bundles)."""

    def owns(self, name: str) -> bool:
        """Whether this provider serves the adapter `name`; rows naming adapters that no
        provider owns are refused before any provider starts."""
        return False

    @abc.abstractmethod
    def inputs(self) -> set[str]:
        """Graph input names this provider feeds."""

    def start(self, ctx: RequestContext) -> Reservation | None:
        """Called once per request before the first step (resolve adapters, pin slots)."""
        return None

    @abc.abstractmethod
    def step(self, ctx: RequestContext, state: StepState) -> None:
        """Add this provider's feeds for one step to `state.feeds`."""

    def fixed_feeds(self) -> dict[str, Feed]:
        """Feeds whose buffers never move for this provider's life (LoRA banks). The loop
        passes them once per binding on backends that keep inputs bound between runs, and
        every step on the others; `step` leaves them out."""
        return {}

    def finish(self, ctx: RequestContext) -> None:  # noqa: B027
        """Called once after the request, also when it failed (release what `start` took)."""
