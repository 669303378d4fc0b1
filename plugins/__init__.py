"""MultiLoRA CUDA kernels, the TensorRT plugin and the ONNX Runtime CPU kernel for the
peft_export::MultiLoRA op.

Importing this package loads nothing: torch, tensorrt and the native libraries (built by
CMake from multilora/, see multilora/README.md) load on first use.
"""

from ._library import (
    KERNELS_LIBRARY,
    ORT_OP_LIBRARY,
    PLUGIN_DIR_ENV,
    PLUGIN_LIBRARY,
    PluginError,
    find_library,
    load_kernels,
)
from .kernels import KernelPath, multilora_forward, workspace_size
from .reference import multilora_reference
from .trt import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, load_trt_plugin

__all__ = [
    "KERNELS_LIBRARY",
    "ORT_OP_LIBRARY",
    "PLUGIN_DIR_ENV",
    "PLUGIN_LIBRARY",
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "KernelPath",
    "PluginError",
    "find_library",
    "load_kernels",
    "load_trt_plugin",
    "multilora_forward",
    "multilora_reference",
    "workspace_size",
]
