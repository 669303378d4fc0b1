"""Build the MultiLoRA CPU kernel (libpeft_multilora_ort.so) for a test session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

from peft_export import plugins


def in_ci() -> bool:
    """CI=true (or any value but "", "0", "false"), as .ci/run runs."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def build_cpu_kernel(build: Path) -> Path:
    """The library built in `build`; skips the test where it cannot be built here, and fails
    it in CI, where scripts/install.sh has made sure it can (else its tests would silently
    not run)."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        _unavailable("cmake and a C++ compiler are needed to build the MultiLoRA CPU kernel")
    subprocess.run(
        ["cmake", "-S", str(plugins._library.SOURCE_DIR), "-B", str(build),
         "-DPEFT_MULTILORA_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    path = build / plugins.ORT_OP_LIBRARY
    if not path.is_file():
        _unavailable("ONNX Runtime headers not found (scripts/fetch_ort_headers.sh): no CPU kernel")
    return path


def _unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(
            f"{reason}; in CI (CI={os.environ['CI']}) the kernel's tests must run: "
            "scripts/install.sh --dev installs what it needs",
            pytrace=False,
        )
    pytest.skip(reason)
