"""Move the memory a session allocated onto 2 MiB pages (Linux `MADV_COLLAPSE`).

Why: a CPU decode step streams every weight of the model from memory (540 MB for SmolLM2 in
fp32). ONNX Runtime keeps weights in ordinary heap memory, which sits on 4 KiB pages when THP
is "madvise" (the usual setting), so each step takes a TLB miss every 4 KiB. Collapsing the
session's memory into huge pages once, after it is loaded, made SmolLM2 decode steps 4-8%
faster here (docs/environment.md).

Only memory mapped while the session was created is collapsed (new mappings, the heap's new
top), so other code's memory is left as it was. Weights that land in memory the process
had mapped before (holes freed earlier in the heap, say of a previous session) stay on
4 KiB pages: the first session of a process gets nearly all of its memory collapsed,
later ones part of it. Collapsing copies the memory once (~1-2 s per GB) and keeps its
contents. It is best effort: on other systems, on kernels before 6.1 or without free huge
pages it does nothing or part of the range, and nothing fails.

`Collapse` does it on a background thread once the session's first run has ended
(`begin()`), one huge page per call: the kernel stalls accesses to the memory it is moving,
and started at load with 64 MiB per call it delayed SmolLM2 int4's first token from ~0.07 s
to 0.10-0.32 s (six loads each). ctypes releases the GIL during madvise.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from peft_export.runtime.host_memory import HUGE_PAGE

MADV_COLLAPSE = 25
CHUNK = HUGE_PAGE
"""Bytes per madvise call: short calls keep each stall short, and a failure (no free huge
page) costs one chunk, not the range."""

Range = tuple[int, int]


def anonymous_ranges(maps: Path = Path("/proc/self/maps")) -> list[Range]:
    """Private writable anonymous mappings of this process (the heap included)."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[1] != "rw-p" or fields[4] != "0":
            continue
        path = fields[5] if len(fields) > 5 else ""
        if path in ("", "[heap]") or path.startswith("[anon:"):
            lo, hi = (int(part, 16) for part in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def new_ranges(before: Iterable[Range], after: Iterable[Range]) -> list[Range]:
    """The parts of `after` that no range of `before` covers: memory mapped since."""
    old = sorted(before)
    pieces = []
    for lo, hi in sorted(after):
        start = lo
        for old_lo, old_hi in old:
            if old_hi <= start or old_lo >= hi:
                continue
            if old_lo > start:
                pieces.append((start, old_lo))
            start = max(start, old_hi)
        if start < hi:
            pieces.append((start, hi))
    return pieces


def huge_page_spans(ranges: Iterable[Range]) -> list[Range]:
    """Each range shrunk to whole 2 MiB pages; ranges with none are dropped."""
    spans = []
    for lo, hi in ranges:
        start = -(-lo // HUGE_PAGE) * HUGE_PAGE
        end = hi // HUGE_PAGE * HUGE_PAGE
        if end > start:
            spans.append((start, end))
    return spans


def collapse(ranges: Iterable[Range]) -> int:
    """Ask the kernel to back `ranges` with huge pages; the bytes it accepted."""
    if not sys.platform.startswith("linux"):
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    accepted = 0
    for start, end in huge_page_spans(ranges):
        for chunk in range(start, end, CHUNK):
            size = min(CHUNK, end - chunk)
            if madvise(chunk, size, MADV_COLLAPSE) == 0:
                accepted += size
    return accepted


class Collapse:
    """`collapse(ranges)` on a daemon thread after `begin()`; `bytes` begins it, waits for it
    and gives its result."""

    def __init__(self, ranges: Iterable[Range]) -> None:
        self._ranges = list(ranges)
        self._accepted = 0
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._run, name="huge-pages", daemon=True)
        self._thread.start()

    def begin(self) -> None:
        self._go.set()

    def _run(self) -> None:
        self._go.wait()
        self._accepted = collapse(self._ranges)

    @property
    def bytes(self) -> int:
        self.begin()
        self._thread.join()
        return self._accepted
