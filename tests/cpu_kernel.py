"""Build the MultiLoRA CPU kernel (libpeft_multilora_ort.so) for a test session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from peft_export import plugins


def build_cpu_kernel(build: Path) -> Path:
    """The library built in `build`; skips the test where it cannot be built here."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to build the MultiLoRA CPU kernel")
    subprocess.run(
        ["cmake", "-S", str(plugins._library.SOURCE_DIR), "-B", str(build),
         "-DPEFT_MULTILORA_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    path = build / plugins.ORT_OP_LIBRARY
    if not path.is_file():
        pytest.skip("ONNX Runtime headers not found (scripts/fetch_ort_headers.sh): no CPU kernel")
    return path
