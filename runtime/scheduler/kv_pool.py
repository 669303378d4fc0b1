"""The decode batch's KV cache: one bounded block of rows x positions, rows joining and leaving.

The graph takes one past [batch, kv_heads, past, head_dim] for all rows and writes the
present [batch, kv_heads, past + 1, head_dim] (a full copy: it concatenates). So the rows of
a decode batch share one past length P, and each row keeps its own positions right-aligned
in columns [P - n, P), masked 0 to their left: a row computes what it computes alone.

- A row joins with its prefilled KV (only the columns its mask kept, so it has no holes)
  written right-aligned; a row longer than P first widens every row on the left.
- A row leaves by moving the last row's block into its place (one row copied).
- Columns no row uses any more are trimmed (one full copy) when they grow to a quarter of P,
  or when the next step would not fit.

Memory is two flat buffers per layer and per key/value of `capacity` positions each (the
ping-pong pair the graph reads and writes), allocated once. `rows x (P + 1) <= capacity` is
kept by admission (`Reservations`): a row is admitted only when every admitted row's worst
case fits beside its own, so a step never needs more room than the pool has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from peft_export.runtime.backends.base import Backend, Buffer, TensorView
from peft_export.runtime.workspace import KVName


class Reservations:
    """Worst-case KV positions of every admitted row (prefilling or decoding)."""

    def __init__(self, max_rows: int, capacity: int) -> None:
        self.max_rows = max_rows
        self.capacity = capacity
        self._worst: dict[int, int] = {}

    def fits(self, worst: int) -> bool:
        """Whether one more row needing up to `worst` positions fits beside the admitted."""
        rows = len(self._worst) + 1
        longest = max(worst, max(self._worst.values(), default=0))
        return rows <= self.max_rows and rows * longest <= self.capacity

    def add(self, row_id: int, worst: int) -> None:
        self._worst[row_id] = worst

    def discard(self, row_id: int) -> None:
        self._worst.pop(row_id, None)

    @property
    def reserved_tokens(self) -> int:
        return sum(self._worst.values())

    def __len__(self) -> int:
        return len(self._worst)


class DecodePool:
    """KV buffers of the decode batch; row order is the batch order of the next step."""

    def __init__(
        self,
        backend: Backend,
        kv_names: list[KVName],
        kv_heads: int,
        head_dim: int,
        dtype: np.dtype,
        capacity: int,
    ) -> None:
        self.kv_names = kv_names
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.capacity = capacity
        elements = capacity * kv_heads * head_dim
        self._buffers: dict[KVName, tuple[Buffer, Buffer]] = {
            name: (
                backend.allocate(dtype, elements, on_host=True),
                backend.allocate(dtype, elements, on_host=True),
            )
            for name in kv_names
        }
        self._front = 0
        self.rows: list[int] = []
        """Row ids in batch order."""
        self.lengths: list[int] = []
        """Cached positions of each row (its columns are [P - n, P))."""
        self.past = 0
        """P: columns of the current layout."""
        self.trims = 0
        self.widenings = 0

    # -- views the step binds --------------------------------------------------------

    def _array(self, name: KVName, which: int, width: int, rows: int | None = None) -> np.ndarray:
        batch = len(self.rows) if rows is None else rows
        shape = (batch, self.kv_heads, width, self.head_dim)
        return self._buffers[name][which].host_array()[: math.prod(shape)].reshape(shape)

    def past_view(self, name: KVName) -> TensorView:
        shape = (len(self.rows), self.kv_heads, self.past, self.head_dim)
        return self._buffers[name][self._front].view(shape)

    def present_view(self, name: KVName) -> TensorView:
        shape = (len(self.rows), self.kv_heads, self.past + 1, self.head_dim)
        return self._buffers[name][1 - self._front].view(shape)

    def step_mask(self) -> np.ndarray:
        """attention_mask [rows, P + 1] of a decode step: each row's columns plus the new one."""
        width = self.past + 1
        starts = self.past - np.asarray(self.lengths, dtype=np.int64)
        return (np.arange(width, dtype=np.int64)[None, :] >= starts[:, None]).astype(np.int64)

    def positions(self) -> np.ndarray:
        """position_ids [rows, 1]: a row's new token comes after its cached positions."""
        return np.asarray(self.lengths, dtype=np.int64)[:, None]

    def advance(self) -> None:
        """After a decode step: the present becomes the past, one column longer per row."""
        self._front = 1 - self._front
        self.past += 1
        self.lengths = [n + 1 for n in self.lengths]

    def fits_step(self) -> bool:
        return len(self.rows) * (self.past + 1) <= self.capacity

    # -- rows joining and leaving ----------------------------------------------------

    def join(self, row_id: int, kv: Mapping[KVName, np.ndarray]) -> None:
        """Add a row whose cache is `kv[name]` [kv_heads, n, head_dim] (no masked columns)."""
        length = next(iter(kv.values())).shape[1]
        rows = len(self.rows) + 1
        if rows * max(self.past, length) > self.capacity:
            self.trim()
        if length > self.past:
            self._widen(length)
        for name in self.kv_names:
            block = self._array(name, self._front, self.past, rows)[rows - 1]
            block[:, : self.past - length] = 0
            block[:, self.past - length :] = kv[name]
        self.rows.append(row_id)
        self.lengths.append(length)

    def leave(self, row_id: int) -> None:
        """Remove a row: the last row's block moves into its place."""
        index = self.rows.index(row_id)
        last = len(self.rows) - 1
        if index != last:
            for name in self.kv_names:
                array = self._array(name, self._front, self.past)
                array[index] = array[last]
            self.rows[index] = self.rows[last]
            self.lengths[index] = self.lengths[last]
        self.rows.pop()
        self.lengths.pop()
        if not self.rows:
            self.past = 0
        elif self.unused_columns() * 4 >= self.past:
            self.trim()

    def unused_columns(self) -> int:
        """Leading columns that no row uses (what `trim` removes)."""
        return self.past - max(self.lengths, default=0)

    def trim(self) -> None:
        """Drop the leading columns no row uses (one copy of the cache)."""
        drop = self.unused_columns()
        if drop <= 0:
            return
        width = self.past - drop
        for name in self.kv_names:
            source = self._array(name, self._front, self.past)
            self._array(name, 1 - self._front, width)[...] = source[:, :, drop:]
        self._front = 1 - self._front
        self.past = width
        self.trims += 1

    def _widen(self, width: int) -> None:
        """Grow P to `width`, every row keeping its columns at the right."""
        extra = width - self.past
        for name in self.kv_names:
            source = self._array(name, self._front, self.past)
            target = self._array(name, 1 - self._front, width)
            target[:, :, :extra] = 0
            target[:, :, extra:] = source
        self._front = 1 - self._front
        self.past = width
        self.widenings += 1

    @property
    def layout_tokens(self) -> int:
        """Positions the current layout occupies (rows x P), padding included."""
        return len(self.rows) * self.past

    @property
    def nbytes(self) -> int:
        return sum(b.capacity * b.dtype.itemsize for pair in self._buffers.values() for b in pair)
