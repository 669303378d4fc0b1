"""Host memory for adapter banks and adapter host copies, on huge pages where Linux allows.

Why: a slot write and a decode step each touch ~20 MB (SmolLM2, all-linear rank 16) spread
over hundreds of bank regions. With 4 KiB pages that is thousands of TLB misses per step;
with 2 MiB transparent huge pages the same copy and the same kernel run about a fifth
faster (docs/known-issues.md). Most distributions set THP to "madvise", so memory has to ask
for them: it comes from an anonymous private mapping, 2 MiB aligned, advised MADV_HUGEPAGE.
Where that is unavailable (other systems, THP "never") the memory is ordinary and zeroed.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Sequence

import numpy as np

HUGE_PAGE = 2 << 20
ALIGN = 64
"""Byte alignment of each carved piece: a cache line, and enough for AVX loads."""


def huge_page_bytes(nbytes: int) -> np.ndarray:
    """A zeroed, writable uint8 array of `nbytes`, `ALIGN`-aligned; huge-page backed (and
    2 MiB aligned) when it spans a huge page."""
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if nbytes < HUGE_PAGE or None in flags:
        return _aligned(np.zeros(nbytes + ALIGN, dtype=np.uint8), ALIGN, nbytes)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags[0] | flags[1])
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # THP off: ordinary pages work, only slower
            region.madvise(advice)
    return _aligned(np.frombuffer(region, dtype=np.uint8), HUGE_PAGE, nbytes)


def _aligned(raw: np.ndarray, alignment: int, nbytes: int) -> np.ndarray:
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes]


def carve(dtype: np.dtype, counts: Sequence[int]) -> list[np.ndarray]:
    """Flat arrays of `counts[i]` elements each, cut from one huge-page block.

    One block instead of one allocation per array keeps every piece on huge pages even
    when each is far smaller than 2 MiB (a bank of one module is a few hundred KiB)."""
    dtype = np.dtype(dtype)
    sizes = [max(int(n), 1) * dtype.itemsize for n in counts]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += math.ceil(size / ALIGN) * ALIGN
    block = huge_page_bytes(total)
    return [
        block[start : start + size].view(dtype) for start, size in zip(offsets, sizes, strict=True)
    ]
