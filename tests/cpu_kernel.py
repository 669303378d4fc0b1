"""Build the MultiLoRA CPU kernel (libpeft_multilora_ort.so) for a test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import NoReturn

import pytest

from peft_export import plugins


def in_ci() -> bool:
    """CI=true (or any value but "", "0", "false"), as .ci/run runs."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def installed_cpu_kernel() -> Path | None:
    """The library scripts/install.sh built (plugins/multilora/build), when no kernel source
    is newer than it: the suite then builds nothing (CI installs it first, and fails if it
    cannot)."""
    library = plugins._library.DEFAULT_BUILD_DIR / plugins.ORT_OP_LIBRARY
    if not library.is_file():
        return None
    sources = [p for p in plugins._library.SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".h")]
    built = library.stat().st_mtime
    return library if all(p.stat().st_mtime <= built for p in sources) else None


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
    cmake_build(build)
    path = build / plugins.ORT_OP_LIBRARY
    if not path.is_file():
        _unavailable("ONNX Runtime headers not found (scripts/fetch_ort_headers.sh): no CPU kernel")
    return path


def cmake_build(build: Path) -> None:
    """`cmake --build`, once more (one job) if it fails; a second failure fails the test with
    the build's last output lines.

    Why the retry: in two full-suite runs on 2026-12-07 the kernel's link failed at the same
    point, with every libstdc++ symbol undefined, while the same object files linked a minute
    later; the first failure's output is kept as a warning so the cause can be found.
    """
    first = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True)
    if first.returncode == 0:
        return
    tail = _tail(first)
    warnings.warn(f"cmake --build {build} failed once, retrying: {tail}", stacklevel=2)
    again = subprocess.run(["cmake", "--build", str(build), "-j", "1"], capture_output=True)
    if again.returncode != 0:
        pytest.fail(f"cmake --build {build} failed twice: {_tail(again)}", pytrace=False)


def _tail(done: subprocess.CompletedProcess) -> str:
    text = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
    return " | ".join(text[-12:])


def _unavailable(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(
            f"{reason}; in CI (CI={os.environ['CI']}) the kernel's tests must run: "
            "scripts/install.sh --dev installs what it needs",
            pytrace=False,
        )
    pytest.skip(reason)
