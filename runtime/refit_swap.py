"""Merged adapters swapped by refitting: one adapter in the engine at a time, never a rebuild.

A merged bundle whose backend can refit (a TensorRT engine built with --refit) serves the
refit sets that `adapters add` wrote. Refitting changes the weights every row sees, so a
request uses one adapter for all its rows, and requests for another adapter wait until the
running ones finish; requests for the adapter already in place run side by side. A row with
no adapter gets the bundle as exported (its merged adapter, if any).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from peft_export.runtime.errors import InferenceError
from peft_export.runtime.providers import InputProvider, RequestContext, StepState

if TYPE_CHECKING:
    from peft_export.runtime.session import Bundle


class Refittable(Protocol):
    def refit(self, name: str | None) -> None:
        """Make the engine's weights those of refit set `name` (None: the base model)."""


class RefitSwapProvider(InputProvider):
    accepts_adapters = True

    def __init__(self, backend: Refittable, refit_sets: set[str], exported: str | None) -> None:
        self.backend = backend
        self.refit_sets = refit_sets
        self.exported = exported
        """The export-time merged adapter, when it has a refit set to return to."""
        self._current: str | None = exported
        self._running = 0
        self._turn = threading.Condition()

    def owns(self, name: str) -> bool:
        return name in self.refit_sets

    def inputs(self) -> set[str]:
        return set()

    def start(self, ctx: RequestContext) -> None:
        wanted = {a for a in ctx.request.adapters if a is not None} or {self.exported}
        if len(wanted) > 1:
            raise InferenceError(
                f"a merged bundle holds one adapter at a time, this request asks for "
                f"{', '.join(sorted(a or 'the exported weights' for a in wanted))}; send one "
                "request per adapter, or export with --mode runtime to mix them in a batch"
            )
        (name,) = wanted
        if name != self.exported and None in ctx.request.adapters:
            raise InferenceError(
                f"rows without an adapter would run with {name!r} refitted into the engine; "
                "name the same adapter for every row, or export with --mode runtime"
            )
        with self._turn:
            while self._running and self._current != name:
                self._turn.wait()
            if self._current != name:
                self._refit(name)
            self._running += 1
        ctx.state[self] = name

    def step(self, ctx: RequestContext, state: StepState) -> None:
        return None

    def finish(self, ctx: RequestContext) -> None:
        if ctx.state.pop(self, False) is False:
            return
        with self._turn:
            self._running -= 1
            self._turn.notify_all()

    def _refit(self, name: str | None) -> None:
        self._current = "<refit failed>"
        self.backend.refit(name)
        self._current = name


def provider_for_bundle(bundle: Bundle) -> RefitSwapProvider | None:
    """PROVIDER_FACTORIES entry: merged bundles with refit sets on a backend that refits."""
    manifest = bundle.manifest
    refit = getattr(bundle.backend, "refit", None)
    if manifest.mode != "merged" or refit is None or not manifest.adapters.installed:
        return None
    if not getattr(getattr(bundle.backend, "record", None), "refittable", False):
        return None
    exported = (manifest.adapters.merged or {}).get("name")
    sets = set(manifest.adapters.installed)
    return RefitSwapProvider(bundle.backend, sets, exported if exported in sets else None)
