"""The merged-adapter swap policy of runtime/refit_swap.py, on a recording stand-in backend.

No engine can be refitted here (no GPU), so these tests check only the provider's rules:
which set each request gets, that a refit never happens while a request with another
adapter runs, and the refusals. The Refitter calls themselves are in TrtBackend.refit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from peft_export.runtime.errors import InferenceError
from peft_export.runtime.providers import RequestContext
from peft_export.runtime.refit_swap import RefitSwapProvider


@dataclass
class RecordingBackend:
    refits: list[str | None] = field(default_factory=list)
    running: dict[str | None, int] = field(default_factory=dict)
    overlap: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refit(self, name: str | None) -> None:
        with self.lock:
            if any(self.running.values()):
                self.overlap.append(f"refit to {name} while {self.running} ran")
            self.refits.append(name)


@dataclass
class FakeRequest:
    adapters: list[str | None]


def context(adapters: list[str | None]) -> RequestContext:
    return RequestContext(request=FakeRequest(adapters), bundle=None, prompt_ids=[[1]] * 3)


def test_rows_without_adapter_get_the_exported_weights() -> None:
    backend = RecordingBackend()
    provider = RefitSwapProvider(backend, {"first", "second"}, exported="first")
    ctx = context([None, None])
    provider.start(ctx)
    provider.finish(ctx)
    assert backend.refits == []
    ctx = context(["second"])
    provider.start(ctx)
    provider.finish(ctx)
    ctx = context([None, "first"])
    provider.start(ctx)
    provider.finish(ctx)
    assert backend.refits == ["second", "first"]
    assert provider.owns("second") and not provider.owns("third")


def test_bundle_without_exported_set_returns_to_the_base() -> None:
    backend = RecordingBackend()
    provider = RefitSwapProvider(backend, {"second"}, exported=None)
    for adapters in (["second"], [None]):
        ctx = context(adapters)
        provider.start(ctx)
        provider.finish(ctx)
    assert backend.refits == ["second", None]


def test_one_adapter_per_request() -> None:
    provider = RefitSwapProvider(RecordingBackend(), {"first", "second"}, exported="first")
    with pytest.raises(InferenceError, match="one adapter at a time"):
        provider.start(context(["first", "second"]))
    with pytest.raises(InferenceError, match="rows without an adapter"):
        provider.start(context(["second", None]))


def test_failed_refit_is_retried_by_the_next_request() -> None:
    backend = RecordingBackend()
    provider = RefitSwapProvider(backend, {"second"}, exported=None)
    backend.refit = lambda name: (_ for _ in ()).throw(InferenceError("refit failed"))
    with pytest.raises(InferenceError):
        provider.start(context(["second"]))
    del backend.refit
    ctx = context(["second"])
    provider.start(ctx)
    provider.finish(ctx)
    assert backend.refits == ["second"]


def test_concurrent_requests_never_refit_under_a_running_one() -> None:
    backend = RecordingBackend()
    provider = RefitSwapProvider(backend, {"a", "b", "c"}, exported=None)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(30):
                name = "abc"[(seed + i // 3) % 3]
                ctx = context([name])
                provider.start(ctx)
                with backend.lock:
                    backend.running[name] = backend.running.get(name, 0) + 1
                    assert provider._current == name
                time.sleep(0.0005)
                with backend.lock:
                    backend.running[name] -= 1
                provider.finish(ctx)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert backend.overlap == []
    assert len(backend.refits) >= 2
