"""Collapsing a session's memory onto huge pages (runtime/huge_pages.py)."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from peft_export.runtime import huge_pages

MAPS = """\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/python
00651000-00652000 rw-p 00051000 08:02 173521      /usr/bin/python
01000000-05000000 rw-p 00000000 00:00 0           [heap]
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
7f0000400000-7f0000600000 rw-p 00000000 00:00 0   [anon:arena]
7f0000600000-7f0000800000 r--p 00000000 00:00 0
7f0000800000-7f0000a00000 rw-s 00000000 00:05 42  /dev/shm/x
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0   [stack]
"""


def test_only_private_writable_anonymous_mappings_are_read(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    assert huge_pages.anonymous_ranges(maps) == [
        (0x01000000, 0x05000000),
        (0x7F0000000000, 0x7F0000400000),
        (0x7F0000400000, 0x7F0000600000),
    ]
    assert huge_pages.anonymous_ranges(tmp_path / "missing") == []


def test_new_ranges_are_memory_mapped_since():
    before = [(0, 100), (200, 300), (400, 500)]
    after = [(0, 100), (150, 350), (600, 700), (400, 500)]
    assert huge_pages.new_ranges(before, after) == [(150, 200), (300, 350), (600, 700)]
    assert huge_pages.new_ranges(before, before) == []


def test_spans_are_whole_huge_pages():
    page = huge_pages.HUGE_PAGE
    assert huge_pages.huge_page_spans([(1, 3 * page + 5), (page + 1, 2 * page - 1)]) == [
        (page, 3 * page)
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_COLLAPSE is Linux-only")
def test_collapse_keeps_the_bytes_of_a_new_mapping():
    before = huge_pages.anonymous_ranges()
    region = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = np.frombuffer(region, dtype=np.uint32)
    data[:] = np.arange(data.size, dtype=np.uint32) * np.uint32(2654435761)
    want = data.copy()
    start = data.ctypes.data
    new = huge_pages.new_ranges(before, huge_pages.anonymous_ranges())
    assert any(lo <= start and start + len(region) <= hi for lo, hi in new)
    accepted = huge_pages.collapse(new)
    assert 0 <= accepted <= sum(hi - lo for lo, hi in new)
    assert np.array_equal(data, want)
    del data
    region.close()


def test_a_collapse_waits_for_the_first_run(monkeypatch):
    calls = []
    monkeypatch.setattr(huge_pages, "collapse", lambda ranges: calls.append(ranges) or 4096)
    pending = huge_pages.Collapse([(0, 8192)])
    pending._thread.join(timeout=0.2)
    assert calls == [] and pending._thread.is_alive()
    pending.begin()
    pending.begin()
    assert pending.bytes == 4096
    assert calls == [[(0, 8192)]]
