"""Finding and loading the built MultiLoRA libraries.

The libraries are built by CMake outside the Python build (nvcc, optional TensorRT), so
they are looked up at run time: $PEFT_EXPORT_PLUGIN_DIR, then the default CMake build
folder, then this package's folder (for installs that ship the .so files beside it).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

KERNELS_LIBRARY = "libpeft_multilora_kernels.so"
PLUGIN_LIBRARY = "libpeft_multilora.so"
ORT_OP_LIBRARY = "libpeft_multilora_ort.so"
PLUGIN_DIR_ENV = "PEFT_EXPORT_PLUGIN_DIR"
ABI_VERSION = 1

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR / "multilora"
DEFAULT_BUILD_DIR = SOURCE_DIR / "build"


class PluginError(RuntimeError):
    """A MultiLoRA library is missing, does not load, or a kernel call failed."""


def search_dirs() -> list[Path]:
    """Folders searched for the libraries, in order."""
    dirs = [DEFAULT_BUILD_DIR, PACKAGE_DIR]
    env = os.environ.get(PLUGIN_DIR_ENV)
    if env:
        dirs.insert(0, Path(env).expanduser())
    return dirs


_NEEDS = {
    KERNELS_LIBRARY: "needs nvcc",
    PLUGIN_LIBRARY: "needs nvcc and -DTENSORRT_ROOT=<TensorRT prefix>",
    ORT_OP_LIBRARY: "needs ONNX Runtime headers: scripts/fetch_ort_headers.sh",
}


def build_hint(name: str = KERNELS_LIBRARY) -> str:
    """How to build library `name`, for error messages."""
    return (
        f"build it with: cmake -S {SOURCE_DIR} -B {DEFAULT_BUILD_DIR} && "
        f"cmake --build {DEFAULT_BUILD_DIR} -j ({_NEEDS.get(name, 'see its README.md')}), "
        f"or set {PLUGIN_DIR_ENV} to the folder holding it"
    )


def find_library(name: str) -> Path:
    """Path of library `name` in the first search folder that has it."""
    dirs = search_dirs()
    for d in dirs:
        candidate = d / name
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(d) for d in dirs)
    raise PluginError(f"{name} not found (looked in {looked}); {build_hint(name)}")


@functools.cache
def load_kernels() -> ctypes.CDLL:
    """The kernels library with its C ABI (peft_multilora.h) typed for ctypes."""
    path = find_library(KERNELS_LIBRARY)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise PluginError(f"cannot load {path}: {e}; {build_hint()}") from e
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.peft_multilora_abi_version.restype = ctypes.c_int
    lib.peft_multilora_abi_version.argtypes = []
    lib.peft_multilora_workspace_size.restype = ctypes.c_size_t
    lib.peft_multilora_workspace_size.argtypes = [i64] * 6
    lib.peft_multilora_forward_path.restype = ctypes.c_int
    lib.peft_multilora_forward_path.argtypes = (
        [ctypes.c_int, ptr, ptr, ptr, ptr]
        + [i64] * 6
        + [ptr, ptr, ctypes.c_size_t, ptr, ctypes.c_int]
    )
    lib.peft_multilora_status_string.restype = ctypes.c_char_p
    lib.peft_multilora_status_string.argtypes = [ctypes.c_int]
    version = lib.peft_multilora_abi_version()
    if version != ABI_VERSION:
        raise PluginError(f"{path} has ABI version {version}, expected {ABI_VERSION}; rebuild it")
    return lib
