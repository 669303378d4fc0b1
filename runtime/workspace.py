"""Preallocated step buffers: the KV cache as ping-pong buffers, and the logits.

The graph reads the past [batch, heads, past, dim] and writes the present
[batch, heads, past + n, dim]. Each layer's key and value get two flat buffers sized for the
whole request: a step binds its past as a view of the first elements of one and its present
into the other, then the two swap roles. A step therefore allocates nothing; buffers grow
only when a request needs more room than any before it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container
from dataclasses import dataclass

import numpy as np

from peft_export.bundle import names
from peft_export.bundle.manifest import KVLayout
from peft_export.runtime.backends.base import Backend, Buffer, KVStep, StepBinding, TensorView
from peft_export.runtime.errors import InferenceError


@dataclass(frozen=True)
class KVName:
    layer: int
    kind: str  # "key" or "value"

    @property
    def past(self) -> str:
        return names.past_key(self.layer) if self.kind == "key" else names.past_value(self.layer)

    @property
    def present(self) -> str:
        if self.kind == "key":
            return names.present_key(self.layer)
        return names.present_value(self.layer)


class Workspace:
    """Buffers and backend binding for one request at a time."""

    def __init__(self, backend: Backend, kv: KVLayout, kv_dtype: np.dtype, logits_dtype: np.dtype):
        self.backend = backend
        self.kv = kv
        self.kv_dtype = np.dtype(kv_dtype)
        self.logits_dtype = np.dtype(logits_dtype)
        self.binding: StepBinding = backend.new_binding()
        self.fixed_bound: int | None = None
        """Which version of the bundle's fixed feeds `binding` holds (backends that retain
        inputs); None: pass them with the next run."""
        self.kv_names = [KVName(i, k) for i in range(kv.num_layers) for k in ("key", "value")]
        self.past_names = frozenset(n.past for n in self.kv_names)
        self._kv: dict[KVName, tuple[Buffer, Buffer]] = {}
        self._kv_capacity = 0
        self._kv_lists: tuple[tuple[tuple[str, Buffer], ...], ...] = ()
        """Per front (0, 1): the (past name, buffer) pairs, then the (present name, buffer)
        pairs; built when the buffers are, so a step assembles nothing per layer."""
        self._logits: Buffer | None = None
        self._front = 0
        self.batch = 0

    def reserve(self, batch: int, max_tokens: int, max_step_tokens: int, vocab: int) -> None:
        """Make room for `batch` rows of `max_tokens` cached positions and one step of
        `max_step_tokens` logits; reset the cache to empty."""
        kv_needed = batch * self.kv.num_kv_heads * max_tokens * self.kv.head_dim
        logits_needed = batch * max_step_tokens * vocab
        try:
            if kv_needed > self._kv_capacity:
                self._kv = {
                    name: (
                        self.backend.allocate(self.kv_dtype, kv_needed),
                        self.backend.allocate(self.kv_dtype, kv_needed),
                    )
                    for name in self.kv_names
                }
                self._kv_capacity = kv_needed
                self._kv_lists = tuple(
                    lists
                    for front in (0, 1)
                    for lists in (
                        tuple((n.past, self._kv[n][front]) for n in self.kv_names),
                        tuple((n.present, self._kv[n][1 - front]) for n in self.kv_names),
                    )
                )
            if self._logits is None or logits_needed > self._logits.capacity:
                self._logits = self.backend.allocate(self.logits_dtype, logits_needed, on_host=True)
        except MemoryError:
            kv_bytes = 2 * len(self.kv_names) * kv_needed * self.kv_dtype.itemsize
            gib = (kv_bytes + logits_needed * self.logits_dtype.itemsize) / 2**30
            raise InferenceError(
                f"this request needs {gib:.1f} GiB of KV cache and logits, more than can be "
                "allocated here; use a smaller batch, shorter prompts or fewer max_new_tokens"
            ) from None
        self.batch = batch
        self._front = 0

    def _shape(self, length: int) -> tuple[int, int, int, int]:
        return (self.batch, self.kv.num_kv_heads, length, self.kv.head_dim)

    def past(self, name: KVName, past_len: int) -> TensorView:
        return self._kv[name][self._front].view(self._shape(past_len))

    def present(self, name: KVName, total_len: int) -> TensorView:
        return self._kv[name][1 - self._front].view(self._shape(total_len))

    def kv_step(self, past_len: int, total_len: int, provided: Container[str] = ()) -> KVStep:
        """The step's KV cache; pasts named in `provided` are fed by someone else (a prefix
        on step 0) and left out."""
        if self.batch * self.kv.num_kv_heads * total_len * self.kv.head_dim > self._kv_capacity:
            raise InferenceError(
                f"a step of {total_len} positions exceeds the KV cache reserved for this "
                "request; this is a runtime bug, please report it"
            )
        past, present = self._kv_lists[2 * self._front : 2 * self._front + 2]
        if provided and not self.past_names.isdisjoint(provided):
            past = tuple(pair for pair in past if pair[0] not in provided)
        return KVStep(past, present, self._shape(past_len), self._shape(total_len))

    def logits(self, step_tokens: int, vocab: int) -> TensorView:
        assert self._logits is not None
        return self._logits.view((self.batch, step_tokens, vocab))

    def swap(self) -> None:
        """After a step: the present just written becomes the next step's past."""
        self._front = 1 - self._front

    def buffers(self) -> list[Buffer]:
        """Every buffer this workspace owns (for checks that nothing is re-allocated)."""
        out = [buf for pair in self._kv.values() for buf in pair]
        return out + ([self._logits] if self._logits is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(b.capacity * b.dtype.itemsize for b in self.buffers())


class WorkspacePool:
    """Hands each concurrent request its own workspace; idle ones are kept for reuse."""

    def __init__(self, factory: Callable[[], Workspace]) -> None:
        self._factory = factory
        self._idle: list[Workspace] = []
        self._lock = threading.Lock()

    def acquire(self) -> Workspace:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._factory()

    def release(self, workspace: Workspace) -> None:
        with self._lock:
            self._idle.append(workspace)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
