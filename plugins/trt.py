"""Registering libpeft_multilora.so with TensorRT's plugin registry."""

from __future__ import annotations

import ctypes
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from ._library import PLUGIN_LIBRARY, PluginError, build_hint, find_library

PLUGIN_NAME = "MultiLoRA"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "peft_export"


def _creator(registry: Any) -> Any:
    return registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)


def load_trt_plugin(trt_module: ModuleType | None = None) -> Path:
    """Loads the plugin library into `trt_module`'s registry (default: `tensorrt`).

    The library is opened with RTLD_GLOBAL, then handed to the registry's load_library,
    which calls its getCreators(); a second call finds the creator registered and does
    nothing. Returns the library's path, which engines built with the plugin need again
    at run time (or serialized into them).
    """
    trt = trt_module if trt_module is not None else importlib.import_module("tensorrt")
    path = find_library(PLUGIN_LIBRARY)
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise PluginError(f"cannot load {path}: {e}; {build_hint(PLUGIN_LIBRARY)}") from e
    registry = trt.get_plugin_registry()
    if _creator(registry) is None:
        registry.load_library(str(path))
        if _creator(registry) is None:
            raise PluginError(
                f"{path} loaded, but TensorRT's registry has no {PLUGIN_NAMESPACE}::"
                f"{PLUGIN_NAME} version {PLUGIN_VERSION} (TensorRT >= 10 is required)"
            )
    return path
