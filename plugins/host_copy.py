"""Bank-slot writes through the CPU library's copy routine (multilora/peft_multilora_host.h).

Optional: without libpeft_multilora_ort.so the adapter store copies with numpy."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

from ._library import ORT_OP_LIBRARY, PluginError, find_library

RegionCopier = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
"""copy(dst_pointers, src_pointers, byte_counts): uintp, uintp and uintp arrays of one length."""


@functools.cache
def region_copier() -> RegionCopier | None:
    """The library's `peft_multilora_copy_regions`, or None when it is not built."""
    try:
        lib = ctypes.CDLL(str(find_library(ORT_OP_LIBRARY)))
    except (PluginError, OSError):
        return None
    fn = lib.peft_multilora_copy_regions
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]

    def copy(dst: np.ndarray, src: np.ndarray, sizes: np.ndarray) -> None:
        if not (len(dst) == len(src) == len(sizes)):
            raise ValueError("dst, src and sizes must have one length")
        fn(dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, len(sizes))

    return copy
