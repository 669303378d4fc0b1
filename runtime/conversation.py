"""A conversation that keeps its KV cache between calls, each call on any adapter.

    chat = Conversation(bundle)
    chat.generate(prompt_ids)                             # the base model
    chat.generate(invocation_ids, adapter="certainty")    # an activated LoRA takes over

Each call feeds only the tokens the cache lacks (the new ones, plus the previous call's last
token, which no step has fed yet), then decodes. The cache stays valid across adapters only
where every cached position was computed as the new call's adapter would compute it: an
activated LoRA (PEFT's `alora_invocation_tokens`) computes the base model before its
invocation, so a base conversation switches to it at no cost; a plain adapter would need the
whole history recomputed, so such a switch is refused with the fix (`rewind`, or a new
conversation) instead of silently mixing two models in one cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from peft_export.bundle.token_inputs import NEVER
from peft_export.runtime.adapters_provider import LoraBankProvider
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.generate import RowDecoder, _check_adapters, _Stepper
from peft_export.runtime.providers import RequestContext
from peft_export.runtime.request import GenerationRequest, RowResult, SamplingOptions
from peft_export.runtime.sampling import choose, row_rng
from peft_export.runtime.slot_rows import invocation_start

if TYPE_CHECKING:
    from peft_export.runtime.session import Bundle

DEFAULT_CAPACITY = 2048
BASE = ""
"""Label of positions computed by the base model."""


class Conversation:
    """One row's token history and KV cache (ORT or TensorRT buffers), held until `close`."""

    def __init__(self, bundle: Bundle, *, capacity: int | None = None) -> None:
        self.bundle = bundle
        self.capacity = int(capacity or bundle.max_positions or DEFAULT_CAPACITY)
        self.tokens: list[int] = []
        self.cached = 0
        """Positions in the KV cache: `tokens[:cached]`."""
        self._labels: list[str] = []
        """Which adapter's delta computed each cached position (BASE: none)."""
        self._workspace = bundle.workspaces.acquire()
        step_tokens = min(self.capacity, bundle.prefill_chunk)
        self._workspace.reserve(1, self.capacity, step_tokens, bundle.manifest.vocab_size)

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the cache buffers back to the bundle (the conversation ends)."""
        if self._workspace is not None:
            self.bundle.workspaces.release(self._workspace)
            self._workspace = None

    def generate(
        self,
        new: Sequence[int] | str,
        *,
        adapter: str | None = None,
        options: SamplingOptions | None = None,
    ) -> RowResult:
        """Append `new` (token ids, or text without special tokens) and generate a reply."""
        if self._workspace is None:
            raise InferenceError("this conversation is closed; start a new Conversation")
        options = options or SamplingOptions()
        history = [*self.tokens, *self._ids(new)]
        if len(history) + options.max_new_tokens > self.capacity:
            raise InferenceError(
                f"{len(history)} tokens + max_new_tokens {options.max_new_tokens} exceed this "
                f"conversation's {self.capacity} positions; start one with a larger capacity"
            )
        start = self._activation(adapter, history)
        label = BASE if adapter is None else adapter
        for position in range(self.cached):
            wanted = label if position >= start else BASE
            if wanted != self._labels[position]:
                raise InferenceError(
                    f"the cached position {position} was computed "
                    f"{_by(self._labels[position])} but adapter {adapter!r} computes it "
                    f"{_by(wanted)} (only an activated LoRA takes over a base cache); call "
                    f"rewind({position}) to recompute from there, or start a new Conversation"
                )
        if len(history) == self.cached:
            raise InferenceError("every token is already cached; pass new tokens to generate")
        request = GenerationRequest(prompts=[history], options=[options], adapters=[adapter])
        result = self._run(request, history)
        self._labels += [
            label if p >= start else BASE for p in range(len(self._labels), self.cached)
        ]
        return result

    def rewind(self, length: int) -> None:
        """Forget the tokens from `length` on (and their cache)."""
        if not 0 <= length <= len(self.tokens):
            have = len(self.tokens)
            raise InferenceError(f"rewind({length}): the conversation has {have} tokens")
        keep = min(length, self.cached)
        workspace = self._workspace
        if keep < self.cached and workspace is not None:
            if all(buffer.on_host for buffer in workspace.buffers()):
                for name in workspace.kv_names:
                    kept = workspace.past(name, self.cached).numpy()[:, :, :keep].copy()
                    workspace.past(name, keep).numpy()[...] = kept
            else:
                keep = 0  # device caches are recomputed rather than compacted in place
        self.tokens = self.tokens[:length]
        self.cached = keep
        self._labels = self._labels[:keep]

    def _ids(self, new: Sequence[int] | str) -> list[int]:
        if isinstance(new, str):
            if self.bundle.codec is None:
                raise InferenceError("this bundle ships no tokenizer; pass token ids")
            return self.bundle.codec.encode_text(new, add_special_tokens=not self.tokens)
        ids = [int(t) for t in new]
        vocab = self.bundle.manifest.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InferenceError(f"token ids outside [0, {vocab}); check them")
        return ids

    def _activation(self, adapter: str | None, history: list[int]) -> int:
        """First position `adapter` computes with its delta (earlier ones: the base model)."""
        if adapter is None:
            return NEVER
        store = next(
            (p.store for p in self.bundle.input_providers if isinstance(p, LoraBankProvider)),
            None,
        )
        entry = store.entry(adapter) if store is not None else None
        if entry is None or not entry.alora_invocation_tokens:
            return 0
        start = invocation_start(history, entry.alora_invocation_tokens)
        return NEVER if start is None else start

    def _run(self, request: GenerationRequest, history: list[int]) -> RowResult:
        bundle = self.bundle
        providers = bundle.input_providers
        _check_adapters(bundle, request, providers)
        ctx = RequestContext(request=request, bundle=bundle, prompt_ids=[history])
        started = []
        try:
            for provider in providers:
                started.append(provider)
                if provider.start(ctx) is not None:
                    raise InferenceError(
                        "prefix and prompt adapters place virtual tokens in front of the "
                        "conversation, so they cannot join one mid-way; use bundle.generate"
                    )
            return self._decode(ctx, history)
        finally:
            for provider in reversed(started):
                provider.finish(ctx)

    def _decode(self, ctx: RequestContext, history: list[int]) -> RowResult:
        bundle, options = self.bundle, ctx.request.options[0]
        pending = history[self.cached :]
        chunk = bundle.prefill_chunk
        bundle.backend.check_steps(
            [{"batch": 1, "seq": min(chunk, len(pending)), "past": self.cached, "prompt_len": 0}]
        )
        try:
            mask = np.ones((1, self.capacity), dtype=np.int64)
            stepper = _Stepper(bundle, ctx, self._workspace, mask, self.cached)
            for start in range(0, len(pending), chunk):
                ids = np.array([pending[start : start + chunk]], dtype=np.int64)
                last = stepper.step(ids, ids.shape[1])
            eos = frozenset(bundle.manifest.tokenizer.eos_token_ids)
            row = RowDecoder(
                options=options,
                stop_ids=frozenset(options.stop_token_ids),
                eos_ids=frozenset() if options.ignore_eos else eos,
                rng=row_rng(options),
            )
            limit = None if ctx.vocab_limits is None else ctx.vocab_limits[0]
            while options.max_new_tokens and not row.finished:
                row.accept(choose(last[0][:limit], options, row.rng), bundle.codec, False)
                if not row.finished:
                    last = stepper.step(np.array([[row.tokens[-1]]], dtype=np.int64), 1)
        except BaseException:
            # Steps may have run and swapped the cache buffers: recompute it next time.
            self.cached, self._labels = 0, []
            raise
        self.tokens = [*history, *row.tokens]
        self.cached = stepper.past_len
        text = bundle.codec.decode(row.tokens) if bundle.codec is not None else ""
        return RowResult(history, row.tokens, text, row.reason or "length")


def _by(label: str) -> str:
    return "by the base model" if label == BASE else f"with adapter {label!r}"
