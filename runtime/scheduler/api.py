"""What callers of the scheduler see: requests, events, results, configuration, handles.

A request is one prompt (token ids) with one adapter name and its own sampling options, so
rows of different users mix in one batch. A handle is how the submitting thread (or an
asyncio task) follows its request: a stream of events, the final result, cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from peft_export.runtime.errors import InferenceError
from peft_export.runtime.request import SamplingOptions

FINISH_REASONS = ("eos", "stop_token", "stop_string", "length", "cancelled", "timeout", "error")
"""Why a request ended: the first four as in `RowResult`; "cancelled" by `cancel()` or
`Scheduler.close()`; "timeout" when `timeout_s` passed (queued or running); "error" when the
step failed (the event's `error` says why)."""


@dataclass(frozen=True)
class ServeRequest:
    """One prompt to complete, with its adapter and sampling options.

    `prompt_ids` are token ids (tokenize with `bundle.codec` first). `adapter` is any adapter
    the bundle holds (LoRA-family slot, prefix, prompt embeddings, LLaMA-Adapter) or None for
    the base model. A greedy request (temperature 0) yields exactly the tokens
    `Bundle.generate(prompt_ids, adapters=adapter, ...)` yields alone; a seeded sampled one
    draws the same random stream as that call with the same seed.
    """

    prompt_ids: Sequence[int]
    adapter: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    """Texts that end the request; the text is cut before the first (needs a tokenizer)."""
    ignore_eos: bool = False
    timeout_s: float | None = None
    """Wall-clock limit from `submit`, queue time included; None: no limit."""
    request_id: str = ""
    """Caller's id for logs; the scheduler numbers requests itself when empty."""

    def sampling(self) -> SamplingOptions:
        """The row's options in the runtime's own type (validates every field)."""
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise InferenceError("timeout_s must be > 0 seconds (or None for no limit)")
        return SamplingOptions(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop_token_ids=tuple(int(t) for t in self.stop_token_ids),
            stop_strings=tuple(self.stop_strings),
            ignore_eos=self.ignore_eos,
        )


@dataclass(frozen=True)
class ServeEvent:
    """One step of one request's stream: a new token, and/or the end of the request.

    The last event of every request has `finish_reason` set; it carries a token unless the
    request ended without one (cancelled, timed out, failed, or max_tokens 0)."""

    token_id: int | None
    text: str = ""
    """Newly decodable text (an open multi-byte character or a possible stop-string start is
    held back until it resolves); empty when the bundle ships no tokenizer."""
    finish_reason: str | None = None
    index: int = 0
    """How many tokens the request had produced before this one."""
    error: str | None = None


@dataclass
class ServeResult:
    """A finished request: its tokens, text and timings."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    """Generated tokens, including the EOS or stop token that ended the request."""
    text: str
    finish_reason: str
    error: str | None = None
    queue_s: float = 0.0
    """Submit to admission (its first prefill step)."""
    ttft_s: float | None = None
    """Submit to first token; None when no token came."""
    total_s: float = 0.0


@dataclass(frozen=True)
class SchedulerConfig:
    """Bounds of one scheduler. Every buffer is allocated once from these, at `start()`.

    KV memory: decoding rows share one cache of `max_rows x positions` (the graph takes one
    past length for all rows, so each row occupies the longest row's length); it holds at
    most `kv_pool_tokens` positions, and a request is admitted only when every running row's
    worst case (prompt + adapter positions + max_tokens) still fits beside its own.
    Prefill runs on its own cache of `prefill_pool_tokens` positions.
    """

    max_rows: int = 16
    """Rows decoding together in one batch."""
    kv_pool_tokens: int = 8192
    """Positions in the decode cache (rows x longest row's worst case must fit)."""
    prefill_pool_tokens: int = 4096
    """Positions in the prefill cache: the longest prompt (with adapter positions) it takes."""
    step_token_budget: int = 512
    """Most prompt tokens (padding included) one step prefills: what a step takes while no
    row decodes. Longer prompts are prefilled in chunks over several steps."""
    prefill_share: float = 0.75
    """While rows decode, a step's prefill chunk is sized (from measured call times) to take
    at most this share of a decode call's time, so a long prompt adds at most about that
    much to running rows' inter-token latency; never fewer than `min_prefill_tokens`."""
    min_prefill_tokens: int = 16
    whole_prefill_tokens: int = 256
    """A group whose prompt tokens (rows x padded length, at most `step_token_budget`) are at
    most this is prefilled in one call even while rows decode: a short prompt then pays one
    call's fixed cost (streaming the weights) instead of several, for a one-off gap in the
    running rows' tokens; only longer prompts are chunked by `prefill_share`."""
    max_queue: int = 256
    """Requests waiting for admission; `submit` raises QueueFullError beyond it."""
    max_wait_s: float = 5.0
    """FCFS with backfill: a queued request that does not fit yet lets later ones that fit go
    first, until it has waited this long; then nothing passes it."""
    host_cache_adapters: int = 64
    """Adapters kept in host memory (LRU, beyond the ones in bank slots and in use)."""
    detokenize: bool = True
    """Decode text per token (event `text`, result `text`, stop strings)."""

    def __post_init__(self) -> None:
        for name in ("max_rows", "kv_pool_tokens", "prefill_pool_tokens", "step_token_budget"):
            if getattr(self, name) < 1:
                raise InferenceError(f"SchedulerConfig.{name} must be at least 1")
        if self.min_prefill_tokens < 1 or self.whole_prefill_tokens < 0:
            raise InferenceError(
                "SchedulerConfig.min_prefill_tokens must be >= 1 and whole_prefill_tokens >= 0"
            )
        if not self.prefill_share > 0:
            raise InferenceError("SchedulerConfig.prefill_share must be > 0")
        if self.max_queue < 0 or self.max_wait_s < 0 or self.host_cache_adapters < 0:
            raise InferenceError(
                "SchedulerConfig max_queue, max_wait_s and host_cache_adapters must be >= 0"
            )


Observer = Callable[[str, float], None]
"""`observer(kind, seconds)` with kind "ttft", "inter_token", "queue_wait" or "e2e", called on
the step thread for every sample (feed Prometheus histograms from it; keep it fast)."""


class RequestHandle:
    """Follows one submitted request. Thread-safe; consume events from one place only
    (`events()` in a thread or `aevents()` in an event loop)."""

    def __init__(self, request_id: str, prompt_ids: list[int], cancel: Callable[[], None]):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.submitted = time.monotonic()
        self._cancel = cancel
        self._events: list[ServeEvent] = []
        self._cond = threading.Condition()
        self._result: ServeResult | None = None
        self._waker: Callable[[], None] | None = None

    # -- consumer side ---------------------------------------------------------------

    def events(self, timeout: float | None = None) -> Iterator[ServeEvent]:
        """Events in order, blocking for each; ends after the one with `finish_reason`.

        `timeout` bounds the wait for each event (TimeoutError), not the whole request."""
        seen = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda n=seen: len(self._events) > n, timeout):
                    raise TimeoutError(f"no event of request {self.request_id} in {timeout} s")
                batch = self._events[seen:]
            seen += len(batch)
            for event in batch:
                yield event
                if event.finish_reason is not None:
                    return

    async def aevents(self) -> AsyncIterator[ServeEvent]:
        """The same events for an asyncio consumer, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        with self._cond:
            self._waker = lambda: loop.call_soon_threadsafe(ready.set)
        seen = 0
        while True:
            ready.clear()
            with self._cond:
                batch = self._events[seen:]
            if not batch:
                await ready.wait()
                continue
            seen += len(batch)
            for event in batch:
                yield event
                if event.finish_reason is not None:
                    return

    def result(self, timeout: float | None = None) -> ServeResult:
        """Block until the request ends and return its result (TimeoutError after `timeout`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.request_id} still running after {timeout} s")
            assert self._result is not None
            return self._result

    async def aresult(self) -> ServeResult:
        """`result()` for asyncio: waits on the request's events without blocking the loop."""
        async for _ in self.aevents():
            pass
        return self.result(timeout=0)

    def done(self) -> bool:
        with self._cond:
            return self._result is not None

    def cancel(self) -> None:
        """Ask the scheduler to end the request ("cancelled"); a no-op once it ended. The
        row leaves the batch at the next step boundary and frees its slot and KV room."""
        self._cancel()

    # -- scheduler side --------------------------------------------------------------

    def _push(self, event: ServeEvent, result: ServeResult | None = None) -> None:
        with self._cond:
            if self._result is not None:
                return
            self._events.append(event)
            if result is not None:
                self._result = result
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's event loop has closed
                waker()


@dataclass
class Samples:
    """Recent latency samples kept for `metrics()` (seconds, newest last)."""

    limit: int = 2048
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, kind: str, seconds: float) -> None:
        bucket = self.values.setdefault(kind, [])
        bucket.append(seconds)
        if len(bucket) > self.limit:
            del bucket[: len(bucket) - self.limit]
