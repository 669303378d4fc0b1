"""The scheduler: a queue of requests and one running batch, advanced by a step thread.

Each step (1) retires cancelled and timed-out requests, (2) admits queued requests FCFS while
their worst-case KV need fits the pool and their adapter can be pinned, (3) prefills one chunk
of admitted prompts within the per-step token budget, (4) decodes one token for every running
row in one batch, and (5) streams each row's token and retires finished rows at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_export.runtime.scheduler.api import (
    Observer,
    RequestHandle,
    SchedulerConfig,
    ServeRequest,
)

if TYPE_CHECKING:
    from peft_export.runtime.session import Bundle


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
        raise NotImplementedError("the scheduler's implementation lands in the next commit")

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Scheduler:
        """Start the background step thread (idempotent); returns self."""
        raise NotImplementedError

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, end every queued and running one ("cancelled"), free their
        slots and KV room, and join the step thread."""
        raise NotImplementedError

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------

    def submit(self, request: ServeRequest) -> RequestHandle:
        """Queue `request`; returns at once. Raises (before queueing) InferenceError for bad
        options, UnknownAdapterError, ContextLengthError (prompt + max_tokens beyond the
        model's positions or the KV pool), QueueFullError, SchedulerClosedError."""
        raise NotImplementedError

    def step(self) -> bool:
        """Run one scheduling step on this thread (only when `start()` was not called);
        False when there was nothing to do."""
        raise NotImplementedError

    def idle(self) -> bool:
        """True when nothing is queued, prefilling or running."""
        raise NotImplementedError

    # -- observation ------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """A snapshot (JSON-able) of the scheduler:

        queue_depth, running_rows, prefilling_rows;
        requests: submitted, admitted, completed, cancelled, timeout, error, rejected;
        tokens: prompt, generated; steps: decode, prefill; step_seconds: decode, prefill;
        kv_pool: capacity_tokens, reserved_tokens (admitted rows' worst cases), layout_tokens
        (rows x positions of the current decode batch), rows;
        adapters: per tier ("host": LoRA-family host copies, "slots": bank slots,
        "prompt_host": prompt-side adapters) hits, misses, evictions, size (+ pinned for slots);
        samples: recent seconds per kind (ttft, inter_token, queue_wait, e2e).
        """
        raise NotImplementedError

    # -- adapter registry -------------------------------------------------------------

    def names(self) -> list[str]:
        """Adapters this scheduler serves (the bundle's installed runtime adapters)."""
        raise NotImplementedError

    def register(self, name: str, path: str | Path, *, replace: bool = False) -> str:
        """Install a converted adapter file (a peft-export `.safetensors` made for this
        bundle, e.g. by `peft-export adapters add` or an in-process converter) into the bundle
        atomically, after checking it fits; returns its method. Requests may use it at once."""
        raise NotImplementedError

    def unregister(self, name: str) -> None:
        """Remove an adapter from the bundle atomically. Running rows that use it finish;
        new requests naming it raise UnknownAdapterError."""
        raise NotImplementedError

    def held(self) -> list[str]:
        """Adapters in host memory or bank slots now (for multiplexing decisions)."""
        raise NotImplementedError

    def load_adapter(self, name: str) -> None:
        """Bring an adapter into host memory ahead of requests (multiplexed loading)."""
        raise NotImplementedError

    def drop_adapter(self, name: str) -> bool:
        """Drop an adapter's host copy and slot; False while a running row uses it."""
        raise NotImplementedError
