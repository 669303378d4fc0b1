"""Huge-page host memory for adapter banks (runtime/host_memory.py)."""

from __future__ import annotations

import numpy as np
import pytest

from peft_export.runtime import host_memory
from peft_export.runtime.backends.base import HostBuffer


def test_large_block_is_huge_page_aligned_zeroed_and_writable():
    block = host_memory.huge_page_bytes(3 * host_memory.HUGE_PAGE + 5)
    assert block.size == 3 * host_memory.HUGE_PAGE + 5
    assert block.ctypes.data % host_memory.HUGE_PAGE == 0
    assert not block.any()
    block[-1] = 7
    assert block[-1] == 7


def test_small_block_is_ordinary_memory():
    block = host_memory.huge_page_bytes(100)
    assert block.size == 100 and block.flags.writeable and not block.any()


def test_carved_pieces_are_aligned_sized_and_disjoint():
    counts = [1000, 3, 0, 70_000, 17]
    pieces = host_memory.carve(np.float32, counts)
    assert [p.size for p in pieces] == [max(n, 1) for n in counts]
    for piece in pieces:
        assert piece.dtype == np.float32 and piece.ctypes.data % host_memory.ALIGN == 0
    for i, piece in enumerate(pieces):
        piece[...] = i
    for i, piece in enumerate(pieces):
        assert (piece == i).all()


def test_host_buffer_over_an_array_checks_it():
    array = host_memory.carve(np.float32, [12])[0]
    buffer = HostBuffer(np.float32, 12, array)
    assert buffer.ptr == array.ctypes.data
    assert np.shares_memory(buffer.view((3, 4)).numpy(), array)
    with pytest.raises(ValueError, match="cannot back"):
        HostBuffer(np.float32, 13, array)
    with pytest.raises(ValueError, match="cannot back"):
        HostBuffer(np.float16, 12, array)
