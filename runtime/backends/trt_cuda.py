"""The few CUDA runtime calls the TensorRT backend needs, through ctypes on libcudart.

TensorRT's Python API takes raw device pointers and a stream handle; this module owns both
without depending on cuda-python, cupy or torch. It is the only file that touches CUDA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np

from peft_export.runtime.backends.base import Buffer
from peft_export.runtime.errors import InferenceError

_H2D, _D2H, _D2D = 1, 2, 3
_LIBRARIES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12")


@functools.cache
def cudart() -> ctypes.CDLL:
    names = [*_LIBRARIES, ctypes.util.find_library("cudart")]
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise InferenceError(
        "the TensorRT backend needs the CUDA runtime (libcudart) and it is not on the library "
        "path; install the CUDA toolkit or the nvidia-cuda-runtime wheel, or use backend 'ort'"
    )


def check(status: int, what: str) -> None:
    if status != 0:
        lib = cudart()
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        message = lib.cudaGetErrorString(status).decode(errors="replace")
        raise InferenceError(f"CUDA {what} failed ({message}); check the GPU and its driver")


def device_count() -> int:
    """Visible CUDA devices (0 when the driver or the runtime has none)."""
    try:
        lib = cudart()
    except InferenceError:
        return 0
    count = ctypes.c_int(0)
    return count.value if lib.cudaGetDeviceCount(ctypes.byref(count)) == 0 else 0


def compute_capability(device: int = 0) -> str:
    lib = cudart()
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    check(lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, device), "device query")
    check(lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device), "device query")
    return f"{major.value}.{minor.value}"


class Stream:
    def __init__(self) -> None:
        self.handle = ctypes.c_void_p()
        check(cudart().cudaStreamCreate(ctypes.byref(self.handle)), "stream creation")

    @property
    def ptr(self) -> int:
        return self.handle.value or 0

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "stream synchronize")

    def __del__(self) -> None:
        if self.handle.value:
            cudart().cudaStreamDestroy(self.handle)


class DeviceBuffer(Buffer):
    """cudaMalloc'ed flat memory; freed with the object."""

    def __init__(self, dtype: np.dtype, capacity: int) -> None:
        super().__init__(dtype, capacity, on_host=False)
        self._ptr = ctypes.c_void_p()
        nbytes = max(capacity, 1) * self.dtype.itemsize
        check(cudart().cudaMalloc(ctypes.byref(self._ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")

    @property
    def ptr(self) -> int:
        return self._ptr.value or 0

    def __del__(self) -> None:
        if self._ptr.value:
            cudart().cudaFree(self._ptr)


def memcpy(dst: int, src: int, nbytes: int, kind: int, stream: Stream) -> None:
    lib = cudart()
    status = lib.cudaMemcpyAsync(
        ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind, stream.handle
    )
    check(status, "memcpy")


def download(dst: np.ndarray, src_ptr: int, stream: Stream) -> None:
    memcpy(dst.ctypes.data, src_ptr, dst.nbytes, _D2H, stream)


def upload(dst_ptr: int, src: np.ndarray, stream: Stream) -> None:
    memcpy(dst_ptr, src.ctypes.data, src.nbytes, _H2D, stream)
