"""The scheduler: a queue of requests and one running batch, advanced by a step thread.

Each step (1) ends cancelled and timed-out requests, (2) admits queued requests FCFS while
their worst-case KV need fits the pool and their adapter can be pinned (later requests may
pass one that does not fit until it has waited `max_wait_s`), (3) prefills one chunk of the
admitted group within the step's token budget (`StepBudget`: large while no row decodes, else
a measured share of a decode call's time; a group of short prompts, up to
`whole_prefill_tokens` together, goes in one call), (4) decodes one token for every running
row in
one batch, and (5) streams each row's token and retires finished rows at once, freeing their
slot and KV room. Model execution lives in `batch_runner.py`, adapter paging in `paging.py`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peft_export.runtime.errors import (
    ContextLengthError,
    InferenceError,
    QueueFullError,
    SchedulerClosedError,
)
from peft_export.runtime.generate import RowDecoder
from peft_export.runtime.prompt_inputs import PROMPT_EMBED_METHODS, PromptAdapter, is_prompt_method
from peft_export.runtime.request import SamplingOptions
from peft_export.runtime.sampling import choose, row_rng
from peft_export.runtime.scheduler.api import (
    Observer,
    RequestHandle,
    Samples,
    SchedulerConfig,
    ServeEvent,
    ServeRequest,
    ServeResult,
)
from peft_export.runtime.scheduler.batch_runner import BatchRunner, PrefillGroup
from peft_export.runtime.scheduler.kv_pool import Reservations
from peft_export.runtime.scheduler.paging import AdapterPager, RowAdapter

if TYPE_CHECKING:
    from peft_export.runtime.session import Bundle

_IDLE_WAIT_S = 0.05


@dataclass(eq=False)
class _Entry:
    """One request's life in the scheduler."""

    id: int
    request: ServeRequest
    handle: RequestHandle
    options: SamplingOptions
    prompt_ids: list[int]
    prompt: PromptAdapter | None
    prefix_len: int
    embed_len: int
    worst: int
    """Decode-pool positions at most: adapter positions + prompt + max_tokens."""
    deadline: float | None
    decoder: RowDecoder
    adapter: RowAdapter | None = None
    state: str = "queued"
    """queued -> prefill -> running -> done."""
    stop: str | None = None
    """"cancelled" or "timeout" once asked; the step thread ends the request."""
    admitted: float | None = None
    first_token: float | None = None
    last_token_at: float | None = None
    last_token: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return self.prefix_len + self.embed_len + len(self.prompt_ids)


class Scheduler:
    """Continuous batching over one loaded bundle (ONNX Runtime on the CPU).

    Thread-safe: `submit`, `cancel`, `metrics` and the adapter registry may be called from
    any thread while the step thread runs. Use it as a context manager, or `start()` and
    `close()`; `step()` runs one step on the caller's thread instead (when not started).
    """

    def __init__(
        self,
        bundle: Bundle,
        config: SchedulerConfig | None = None,
        *,
        observer: Observer | None = None,
    ) -> None:
        self.bundle = bundle
        self.config = config = config or SchedulerConfig()
        if bundle.backend.device != "cpu":
            raise InferenceError(
                f"the scheduler keeps its KV pool in host memory and runs on the CPU; this "
                f"bundle is loaded on {bundle.backend.device}: load it with device='cpu'"
            )
        layout = bundle.manifest.adapters
        if config.step_token_budget <= layout.prompt_max_len:
            raise InferenceError(
                f"step_token_budget ({config.step_token_budget}) must exceed the bundle's "
                f"prompt_max_len ({layout.prompt_max_len}): a prompt-tuned row prefills its "
                "virtual tokens in one step"
            )
        self.pager = AdapterPager(bundle, config.host_cache_adapters)
        self.runner = BatchRunner(
            bundle,
            max_rows=config.max_rows,
            kv_pool_tokens=config.kv_pool_tokens,
            prefill_pool_tokens=config.prefill_pool_tokens,
            step_token_budget=config.step_token_budget,
            prefill_share=config.prefill_share,
            min_prefill_tokens=config.min_prefill_tokens,
            whole_prefill_tokens=config.whole_prefill_tokens,
        )
        self.reservations = Reservations(config.max_rows, config.kv_pool_tokens)
        self._observer = observer
        self._need_text = config.detokenize and bundle.codec is not None
        self._eos = frozenset(bundle.manifest.tokenizer.eos_token_ids)
        self._lock = threading.Condition()
        self._queue: list[_Entry] = []
        self._active: dict[int, _Entry] = {}
        self._group: tuple[PrefillGroup, list[_Entry]] | None = None
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._samples = Samples()
        self._counts = dict.fromkeys(
            (
                "submitted",
                "admitted",
                "completed",
                "cancelled",
                "timeout",
                "error",
                "rejected",
                "prompt_tokens",
                "generated_tokens",
            ),
            0,
        )

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Scheduler:
        """Start the background step thread (idempotent); returns self."""
        with self._lock:
            if self._closed:
                raise SchedulerClosedError("this scheduler is closed; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="peft-export-scheduler", daemon=True
                )
                self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, end every queued and running one ("cancelled"), free their
        slots and KV room, and join the step thread."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._lock:
            queued, self._queue = self._queue, []
        for entry in queued:
            self._finish(entry, "cancelled")
        for entry in list(self._active.values()):
            self._finish(entry, "cancelled")
        if self._group is not None:
            self._end_group()

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------

    def submit(self, request: ServeRequest) -> RequestHandle:
        """Queue `request`; returns at once. Raises (before queueing) InferenceError for bad
        options, UnknownAdapterError, ContextLengthError (prompt + max_tokens beyond the
        model's positions or the KV pool), QueueFullError, SchedulerClosedError."""
        options = request.sampling()
        ids = self._check_prompt(request)
        prompt, prefix_len, embed_len = None, 0, 0
        if request.adapter is not None:
            method = self.pager.method_of(request.adapter)
            if is_prompt_method(method):
                prompt = self.pager.prompt_adapter(request.adapter)
                if method in PROMPT_EMBED_METHODS:
                    embed_len = prompt.length
                elif method != "adaption_prompt":
                    prefix_len = prompt.length
        positions = prefix_len + embed_len + len(ids)
        worst = positions + options.max_new_tokens
        self._check_room(positions, worst, options.max_new_tokens)
        entry_id = next(self._ids)
        handle = RequestHandle(request.request_id or f"req-{entry_id}", ids, lambda: None)
        entry = _Entry(
            id=entry_id,
            request=request,
            handle=handle,
            options=options,
            prompt_ids=ids,
            prompt=prompt,
            prefix_len=prefix_len,
            embed_len=embed_len,
            worst=worst,
            deadline=None if request.timeout_s is None else handle.submitted + request.timeout_s,
            decoder=RowDecoder(
                options=options,
                stop_ids=frozenset(options.stop_token_ids),
                eos_ids=frozenset() if options.ignore_eos else self._eos,
                rng=row_rng(options),
            ),
        )
        handle._cancel = lambda: self._cancel(entry)
        with self._lock:
            if self._closed:
                raise SchedulerClosedError("the scheduler is closed and takes no new requests")
            if len(self._queue) >= self.config.max_queue:
                self._counts["rejected"] += 1
                raise QueueFullError(
                    f"the scheduler's queue is full ({self.config.max_queue} requests); retry later"
                )
            self._counts["submitted"] += 1
            if options.max_new_tokens == 0:
                entry.state = "done"
            else:
                self._queue.append(entry)
                self._lock.notify_all()
        if entry.state == "done":
            self._complete(entry, "length")
        return handle

    def _check_prompt(self, request: ServeRequest) -> list[int]:
        ids = [int(t) for t in request.prompt_ids]
        if not ids:
            raise InferenceError("the prompt is empty; give it at least one token")
        vocab = self.bundle.manifest.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InferenceError(f"the prompt has token ids outside [0, {vocab}); check them")
        if request.stop_strings and self.bundle.codec is None:
            raise InferenceError(
                "stop strings need the bundle's tokenizer, which it does not ship; use "
                "stop_token_ids"
            )
        return ids

    def _check_room(self, positions: int, worst: int, max_tokens: int) -> None:
        limit = self.bundle.max_positions
        if limit and worst > limit:
            raise ContextLengthError(
                f"the prompt ({positions} positions) + max_tokens ({max_tokens}) exceeds the "
                f"model's {limit} positions; shorten the prompt or lower max_tokens"
            )
        config = self.config
        if worst > config.kv_pool_tokens or positions > config.prefill_pool_tokens:
            raise ContextLengthError(
                f"the prompt ({positions} positions) + max_tokens ({max_tokens}) exceeds the "
                f"scheduler's KV pool ({config.kv_pool_tokens} positions, prefill "
                f"{config.prefill_pool_tokens}); shorten it or raise kv_pool_tokens"
            )

    def _cancel(self, entry: _Entry) -> None:
        with self._lock:
            if entry.state == "queued" and entry in self._queue:
                self._queue.remove(entry)
                entry.state = "done"
            elif entry.state in ("prefill", "running") and entry.stop is None:
                entry.stop = "cancelled"
                self._lock.notify_all()
                return
            else:
                return
        self._complete(entry, "cancelled")

    def step(self) -> bool:
        """Run one scheduling step on this thread (only when `start()` was not called);
        False when there was nothing to do."""
        if self._thread is not None:
            raise InferenceError("the scheduler's step thread is running; do not call step()")
        return self._step()

    def idle(self) -> bool:
        """True when nothing is queued, prefilling or running."""
        with self._lock:
            return not self._queue and not self._active and self._group is None

    # -- the step ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            try:
                worked = self._step()
            except Exception as exc:  # a bug must not leave clients waiting forever
                self._fail_all(f"the scheduler's step failed: {type(exc).__name__}: {exc}")
                worked = False
            if not worked:
                with self._lock:
                    if not self._closed:
                        self._lock.wait(self._idle_wait())

    def _fail_all(self, error: str) -> None:
        """End every admitted request with `error` and start over with an empty batch."""
        group, self._group = self._group, None
        entries = list(self._active.values()) + (group[1] if group else [])
        for entry in entries:
            self._finish(entry, "error", error)
        for row in list(self.runner.pool.rows):
            self.runner.leave(row)

    def _idle_wait(self) -> float:
        deadlines = [e.deadline for e in self._queue if e.deadline is not None]
        if not deadlines:
            return _IDLE_WAIT_S if self._queue else 1.0
        return max(0.0, min(min(deadlines) - time.monotonic(), _IDLE_WAIT_S))

    def _step(self) -> bool:
        now = time.monotonic()
        self._stop_requested(now)
        self._admit(now)
        worked = False
        if self._group is not None:
            self._prefill_step()
            worked = True
        if self.runner.pool.rows:
            self._decode_step()
            worked = True
        return worked

    def _stop_requested(self, now: float) -> None:
        """End requests that were cancelled or ran out of time."""
        with self._lock:
            expired = [e for e in self._queue if e.deadline is not None and now >= e.deadline]
            for entry in expired:
                self._queue.remove(entry)
                entry.state = "done"
            for entry in self._active.values():
                if entry.stop is None and entry.deadline is not None and now >= entry.deadline:
                    entry.stop = "timeout"
            stopping = [e for e in self._active.values() if e.stop is not None]
        for entry in expired:
            self._complete(entry, "timeout")
        for entry in stopping:
            if entry.state == "running":
                self._finish(entry, entry.stop or "cancelled")
            elif entry.state == "prefill" and not entry.handle.done():
                # the group's call still reads its slot: released when the group ends
                self._complete(entry, entry.stop or "cancelled")

    def _admit(self, now: float) -> None:
        if self._group is not None:
            return
        with self._lock:
            queue = list(self._queue)
        members: list[_Entry] = []
        budget = self.runner.group_tokens()
        for entry in queue:
            if entry.stop is not None:
                continue
            adapter = None
            if self._fits_group(members, entry, budget) and self.reservations.fits(entry.worst):
                try:
                    adapter = self.pager.try_pin(entry.request.adapter, entry.prompt)
                except InferenceError as exc:  # e.g. unregistered or replaced by a bad file
                    self._drop_queued(entry, str(exc))
                    continue
            if adapter is not None:
                entry.adapter = adapter
                self.reservations.add(entry.id, entry.worst)
                members.append(entry)
                continue
            if now - entry.handle.submitted >= self.config.max_wait_s:
                break  # it waited long enough: nothing passes it
        if not members:
            return
        admitted: list[_Entry] = []
        with self._lock:
            for entry in members:
                if entry in self._queue:
                    self._queue.remove(entry)
                    entry.state = "prefill"
                    entry.admitted = now
                    self._active[entry.id] = entry
                    admitted.append(entry)
            self._counts["admitted"] += len(admitted)
        for entry in members:
            if entry not in admitted:
                self._release(entry)
        if not admitted:
            return
        for entry in admitted:
            self._observe("queue_wait", now - entry.handle.submitted)
        try:
            group = self.runner.new_group(
                [e.id for e in admitted],
                [e.prompt_ids for e in admitted],
                [e.adapter or RowAdapter(None) for e in admitted],
            )
        except InferenceError as exc:
            for entry in admitted:
                self._finish(entry, "error", str(exc))
            return
        self._group = (group, admitted)

    def _drop_queued(self, entry: _Entry, error: str) -> None:
        with self._lock:
            if entry not in self._queue:
                return
            self._queue.remove(entry)
            entry.state = "done"
        self._complete(entry, "error", error)

    def _fits_group(self, members: list[_Entry], entry: _Entry, budget: int) -> bool:
        """The first row of a group may be long (chunked); more rows only while the whole
        group prefills in one step of `budget` tokens and fits the prefill pool."""
        if not members:
            return True
        rows = [*members, entry]
        prefix = max(e.prefix_len for e in rows)
        embed = max(e.embed_len for e in rows)
        text = max(len(e.prompt_ids) for e in rows)
        config = self.config
        return (
            len(rows) <= config.max_rows
            and len(rows) * (embed + text) <= budget
            and len(rows) * (prefix + embed + text) <= config.prefill_pool_tokens
        )

    def _prefill_step(self) -> None:
        assert self._group is not None
        group, entries = self._group
        try:
            logits = self.runner.prefill(group)
        except InferenceError as exc:
            for entry in entries:
                self._finish(entry, "error", str(exc))
            self._end_group()
            return
        if logits is None:
            return
        now = time.monotonic()
        for b, entry in enumerate(entries):
            if entry.state != "prefill" or entry.handle.done():
                continue
            self._counts["prompt_tokens"] += len(entry.prompt_ids)
            token = choose(logits[b], entry.options, entry.decoder.rng)
            entry.first_token = now
            self._observe("ttft", now - entry.handle.submitted)
            if self._emit(entry, token, now):
                continue
            self.runner.join_decode(group, b)
            entry.state = "running"
        self._end_group()

    def _end_group(self) -> None:
        """Forget the prefill group; rows that did not move to the decode batch let go."""
        assert self._group is not None
        _, entries = self._group
        self._group = None
        for entry in entries:
            if entry.state != "running":
                self._finish(entry, entry.stop or "cancelled")

    def _decode_step(self) -> None:
        pool = self.runner.pool
        entries = [self._active[r] for r in pool.rows]
        tokens = np.array([e.last_token for e in entries], dtype=np.int64)
        slots = np.array([e.adapter.slot if e.adapter else 0 for e in entries], dtype=np.int64)
        try:
            logits = self.runner.decode(tokens, slots)
        except InferenceError as exc:
            for entry in entries:
                self._finish(entry, "error", str(exc))
            return
        now = time.monotonic()
        for b, entry in enumerate(entries):
            token = choose(logits[b], entry.options, entry.decoder.rng)
            if entry.last_token_at is not None:
                self._observe("inter_token", now - entry.last_token_at)
            self._emit(entry, token, now)

    def _emit(self, entry: _Entry, token: int, now: float) -> bool:
        """Accept and stream one token; True when it ended the request. A finished row
        leaves the batch and frees its slot and KV room before its last event is sent."""
        decoder = entry.decoder
        index = len(decoder.tokens)
        need_text = self._need_text or bool(entry.options.stop_strings)
        decoder.accept(token, self.bundle.codec, need_text)
        entry.last_token = token
        entry.last_token_at = now
        self._counts["generated_tokens"] += 1
        reason = decoder.reason
        delta = decoder.stream_delta() if need_text else ""
        if reason is None:
            entry.handle._push(ServeEvent(token, delta, None, index))
            return False
        result = self._result(entry, reason)
        self._release(entry)
        with self._lock:
            self._counts["completed"] += 1
        self._observe("e2e", now - entry.handle.submitted)
        entry.handle._push(ServeEvent(token, delta, reason, index), result)
        return True

    # -- ending requests --------------------------------------------------------------

    def _finish(self, entry: _Entry, reason: str, error: str | None = None) -> None:
        """End an admitted request: free what it holds, then stream its end (if not sent)."""
        self._release(entry)
        if not entry.handle.done():
            self._complete(entry, reason, error)

    def _release(self, entry: _Entry) -> None:
        if entry.state == "running" and entry.id in self.runner.pool.rows:
            self.runner.leave(entry.id)
        if entry.adapter is not None:
            self.pager.release(entry.adapter)
            entry.adapter = None
        self.reservations.discard(entry.id)
        with self._lock:
            self._active.pop(entry.id, None)
            entry.state = "done"

    def _complete(self, entry: _Entry, reason: str, error: str | None = None) -> None:
        """Send the final event of a request that ended without a new token."""
        result = self._result(entry, reason, error)
        with self._lock:
            key = {"cancelled": "cancelled", "timeout": "timeout", "error": "error"}.get(
                reason, "completed"
            )
            self._counts[key] += 1
        entry.handle._push(ServeEvent(None, "", reason, len(entry.decoder.tokens), error), result)

    def _result(self, entry: _Entry, reason: str, error: str | None = None) -> ServeResult:
        decoder = entry.decoder
        codec = self.bundle.codec
        need_text = self._need_text or bool(entry.options.stop_strings)
        text = decoder.text if need_text or codec is None else codec.decode(decoder.tokens)
        submitted = entry.handle.submitted
        return ServeResult(
            request_id=entry.handle.request_id,
            prompt_ids=list(entry.prompt_ids),
            token_ids=list(decoder.tokens),
            text=text,
            finish_reason=reason,
            error=error,
            queue_s=(entry.admitted or time.monotonic()) - submitted,
            ttft_s=None if entry.first_token is None else entry.first_token - submitted,
            total_s=time.monotonic() - submitted,
        )

    def _observe(self, kind: str, seconds: float) -> None:
        self._samples.add(kind, seconds)
        if self._observer is not None:
            self._observer(kind, seconds)

    # -- observation ------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """A snapshot (JSON-able) of the scheduler:

        queue_depth, running_rows, prefilling_rows;
        requests: submitted, admitted, completed, cancelled, timeout, error, rejected;
        tokens: prompt, generated; steps: decode, prefill; step_seconds: decode, prefill,
        kv_moves (rows joining and leaving the decode pool);
        kv_pool: capacity_tokens, reserved_tokens and reserved_rows (admitted rows' worst
        cases), layout_tokens (rows x positions of the current decode batch), rows, trims,
        widenings, decode_fill (positions attended / positions computed over all decode
        steps: what the shared past length costs in padding);
        adapters: per tier ("host": LoRA-family host copies, "slots": bank slots,
        "prompt_host": prompt-side adapters) hits, misses, evictions, size (+ pinned for slots);
        samples: recent seconds per kind (ttft, inter_token, queue_wait, e2e).
        """
        runner = self.runner
        with self._lock:
            counts = dict(self._counts)
            group = self._group
            samples = {k: list(v) for k, v in self._samples.values.items()}
            out = {
                "queue_depth": len(self._queue),
                "running_rows": len(runner.pool.rows),
                "prefilling_rows": 0 if group is None else len(group[1]),
            }
        tokens = {
            "prompt": counts.pop("prompt_tokens"),
            "generated": counts.pop("generated_tokens"),
        }
        return {
            **out,
            "requests": counts,
            "tokens": tokens,
            "steps": dict(runner.calls),
            "step_seconds": dict(runner.seconds),
            "kv_pool": {
                "capacity_tokens": self.config.kv_pool_tokens,
                "reserved_tokens": self.reservations.reserved_tokens,
                "reserved_rows": len(self.reservations),
                "layout_tokens": runner.pool.layout_tokens,
                "rows": len(runner.pool.rows),
                "trims": runner.pool.trims,
                "widenings": runner.pool.widenings,
                "decode_fill": runner.decode_positions["used"]
                / max(1, runner.decode_positions["layout"]),
            },
            "adapters": self.pager.stats(),
            "samples": samples,
        }

    # -- adapter registry -------------------------------------------------------------

    def names(self) -> list[str]:
        """Adapters this scheduler serves (the bundle's installed runtime adapters)."""
        return self.pager.names()

    def register(self, name: str, path: str | Path, *, replace: bool = False) -> str:
        """Install a converted adapter file (a peft-export `.safetensors` made for this
        bundle, e.g. by `peft-export adapters add` or an in-process converter) into the bundle
        atomically, after checking it fits; returns its method. Requests may use it at once."""
        return self.pager.register({name: Path(path)}, replace=replace)[name]

    def register_many(
        self, files: Mapping[str, str | Path], *, replace: bool = False
    ) -> dict[str, str]:
        """`register` for many adapters in one bundle update (all or none; one manifest
        write instead of one per adapter); returns each name's method."""
        return self.pager.register({n: Path(p) for n, p in files.items()}, replace=replace)

    def unregister(self, name: str) -> None:
        """Remove an adapter from the bundle atomically. Running rows that use it finish;
        new requests naming it raise UnknownAdapterError."""
        self.pager.unregister(name)

    def held(self) -> list[str]:
        """Adapters in host memory or bank slots now (for multiplexing decisions)."""
        return self.pager.held()

    def load_adapter(self, name: str) -> None:
        """Bring an adapter into host memory ahead of requests (multiplexed loading)."""
        self.pager.load(name)

    def drop_adapter(self, name: str) -> bool:
        """Drop an adapter's host copy and slot; False while a running row uses it."""
        return self.pager.drop(name)
