"""What the HTTP server runs requests on: one interface, two engines.

`SchedulerEngine` submits every request to the continuous-batching scheduler (one batch
across all requests and adapters). `ThreadEngine` is how the runtime served before it: each
request runs alone through `Bundle.run` on its own thread. Both exist so the server, the Ray
app and `scripts/bench_serving.py` compare them behind the same HTTP layer.

An engine hands back a `Handle` whose `events()` is a blocking iterator of `Piece`s (a token's
new text, and on the last one the finish reason); the server pumps it into asyncio.
"""

from __future__ import annotations

import abc
import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from peft_export.bundle.manifest import load_manifest
from peft_export.runtime.errors import InferenceError, QueueFullError, UnknownAdapterError
from peft_export.runtime.request import GenerationRequest, SamplingOptions, TokenEvent
from peft_export.runtime.scheduler import (
    RequestHandle,
    Scheduler,
    SchedulerConfig,
    ServeEvent,
    ServeRequest,
)
from peft_export.runtime.session import Bundle

FINISH_REASONS = {"eos": "stop", "stop_token": "stop", "stop_string": "stop", "length": "length"}
"""The runtime's finish reasons as OpenAI spells them."""


@dataclass(frozen=True)
class Piece:
    """One generated token of a request: its newly decodable text; `finish_reason` (OpenAI
    spelling) on the last one."""

    text: str
    finish_reason: str | None = None
    tokens: int = 1
    """Tokens this piece stands for (0 for a closing piece that only carries the reason)."""


@dataclass
class EngineStats:
    queue_depth: int = 0
    running_rows: int = 0
    adapter_cache: dict[str, dict[str, int]] = field(default_factory=dict)
    """tier -> {"hits", "misses", "evictions"}: what the engine's adapter tiers counted."""


class Handle(abc.ABC):
    """A submitted request."""

    @abc.abstractmethod
    def events(self) -> Iterator[Piece]:
        """Blocking iterator of pieces; raises InferenceError if the request fails."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop the request (a client went away); idempotent."""

    async def aevents(self) -> AsyncIterator[Piece]:
        """`events()` for an event loop: a thread pumps the blocking iterator into a queue."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def pump() -> None:
            try:
                for piece in self.events():
                    loop.call_soon_threadsafe(pieces.put_nowait, piece)
            except BaseException as exc:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(pieces.put_nowait, exc)
            loop.call_soon_threadsafe(pieces.put_nowait, _DONE)

        threading.Thread(target=pump, name="peft-export-pump", daemon=True).start()
        while True:
            item = await pieces.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Engine(abc.ABC):
    name: str

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @abc.abstractmethod
    def submit(
        self, prompt_ids: list[int], options: SamplingOptions, adapter: str | None
    ) -> Handle:
        """Queue one row; raises QueueFullError, UnknownAdapterError, ContextLengthError or
        InferenceError at once."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    def adapters(self) -> list[str]:
        """Adapters the bundle holds now (read from its manifest on disk)."""
        return sorted(load_manifest(self.bundle.root).adapters.installed)

    def owns(self, adapter: str) -> bool:
        return any(p.owns(adapter) for p in self.bundle.input_providers)

    def register(self, name: str, path: Path, *, replace: bool = False) -> str:
        """Install a converted adapter file into the bundle; returns its method."""
        raise InferenceError(
            f"the {self.name} engine cannot add adapters while serving; "
            "serve with the scheduler engine, or use 'peft-export adapters add'"
        )

    def unregister(self, name: str) -> None:
        raise InferenceError(
            f"the {self.name} engine cannot remove adapters while serving; "
            "serve with the scheduler engine, or use 'peft-export adapters remove'"
        )

    def load_adapter(self, name: str) -> None:  # noqa: B027 (nothing to warm up)
        """Bring an adapter into memory ahead of its requests (Ray Serve multiplexing)."""

    def close(self) -> None:  # noqa: B027 (engines without resources need nothing)
        """Stop taking requests and release threads."""


class _Cancelled(Exception):
    """Raised inside the stream callback to stop a cancelled request's loop."""


_DONE = object()


class _ThreadHandle(Handle):
    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def events(self) -> Iterator[Piece]:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        self.cancelled.set()


class ThreadEngine(Engine):
    """One request per thread through `Bundle.run` (the runtime before the scheduler): at most
    `max_running` requests run at once, each its own batch; up to `max_queue` wait."""

    name = "threads"

    def __init__(self, bundle: Bundle, *, max_running: int = 16, max_queue: int = 256) -> None:
        super().__init__(bundle)
        self.max_running = max_running
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(max_running, thread_name_prefix="peft-export-request")
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0

    def submit(
        self, prompt_ids: list[int], options: SamplingOptions, adapter: str | None
    ) -> Handle:
        if adapter is not None and not self.owns(adapter):
            raise UnknownAdapterError(f"unknown adapter {adapter!r}")
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFullError(f"{self._waiting} requests are queued already; retry later")
            self._waiting += 1
        handle = _ThreadHandle()
        self._pool.submit(self._run, handle, prompt_ids, options, adapter)
        return handle

    def _run(
        self, handle: _ThreadHandle, prompt_ids: list[int], options: SamplingOptions, adapter
    ) -> None:
        with self._lock:
            self._waiting -= 1
            self._running += 1

        def on_token(event: TokenEvent) -> None:
            if handle.cancelled.is_set():
                raise _Cancelled
            handle.queue.put(Piece(event.text))

        try:
            if handle.cancelled.is_set():
                return
            request = GenerationRequest(
                prompts=[prompt_ids], options=[options], adapters=[adapter], stream=on_token
            )
            result = self.bundle.run(request)
            row = result.rows[0]
            handle.queue.put(Piece("", FINISH_REASONS.get(row.finish_reason, "stop"), 0))
        except _Cancelled:
            pass
        except InferenceError as exc:
            handle.queue.put(exc)
        except Exception as exc:  # an ONNX Runtime failure: the request fails, not the server
            handle.queue.put(InferenceError(f"generation failed: {exc}"))
        finally:
            with self._lock:
                self._running -= 1
            handle.queue.put(_DONE)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(queue_depth=self._waiting, running_rows=self._running)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _SchedulerHandle(Handle):
    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle

    def events(self) -> Iterator[Piece]:
        for event in self.handle.events():
            piece = _piece(event)
            if piece is None:
                return
            yield piece

    async def aevents(self) -> AsyncIterator[Piece]:
        async for event in self.handle.aevents():
            piece = _piece(event)
            if piece is None:
                return
            yield piece

    def cancel(self) -> None:
        self.handle.cancel()


def _piece(event: ServeEvent) -> Piece | None:
    """A scheduler event as a piece; None for a cancelled end (the client left)."""
    reason = event.finish_reason
    if reason in ("error", "timeout"):
        raise InferenceError(event.error or f"the request ended: {reason}")
    if reason == "cancelled":
        return None
    finish = None if reason is None else FINISH_REASONS.get(reason, "stop")
    return Piece(event.text, finish, 0 if event.token_id is None else 1)


class SchedulerEngine(Engine):
    """Every request joins the scheduler's one running batch (continuous batching)."""

    name = "scheduler"

    def __init__(self, bundle: Bundle, config: SchedulerConfig | None = None) -> None:
        super().__init__(bundle)
        self.scheduler = Scheduler(bundle, config).start()

    def submit(
        self, prompt_ids: list[int], options: SamplingOptions, adapter: str | None
    ) -> Handle:
        request = ServeRequest(
            prompt_ids=prompt_ids,
            adapter=adapter,
            max_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            seed=options.seed,
            stop_token_ids=options.stop_token_ids,
            stop_strings=options.stop_strings,
            ignore_eos=options.ignore_eos,
        )
        return _SchedulerHandle(self.scheduler.submit(request))

    def stats(self) -> EngineStats:
        metrics = self.scheduler.metrics()
        tiers = {
            tier: {k: int(v) for k, v in counts.items() if k in ("hits", "misses", "evictions")}
            for tier, counts in metrics.get("adapters", {}).items()
        }
        return EngineStats(
            queue_depth=int(metrics.get("queue_depth", 0)),
            running_rows=int(metrics.get("running_rows", 0)),
            adapter_cache=tiers,
        )

    def adapters(self) -> list[str]:
        return sorted(self.scheduler.names())

    def owns(self, adapter: str) -> bool:
        return adapter in self.scheduler.names()

    def register(self, name: str, path: Path, *, replace: bool = False) -> str:
        return self.scheduler.register(name, path, replace=replace)

    def unregister(self, name: str) -> None:
        self.scheduler.unregister(name)

    def load_adapter(self, name: str) -> None:
        self.scheduler.load_adapter(name)

    def close(self) -> None:
        self.scheduler.close()


ENGINES = {"scheduler": SchedulerEngine, "threads": ThreadEngine}
