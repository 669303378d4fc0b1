"""Is there a CUDA GPU here, and which compute capability? (driver API through ctypes)

The engine builder needs this only to name what full TensorRT builds for and to explain
failures that need a GPU; nothing here allocates memory.
"""

from __future__ import annotations

import ctypes
import functools

_ATTR_MAJOR = 75
_ATTR_MINOR = 76


@functools.cache
def gpu_compute_capability() -> str | None:
    """'9.0' for device 0, or None when no driver or no device is visible."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    device = ctypes.c_int(0)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_MAJOR, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_MINOR, device)
    return f"{major.value}.{minor.value}"
