"""A separate virtual environment with the AdapterHub `adapters` library, for parity references.

`adapters` 1.3.0 pins transformers ~= 4.57.6 while peft-export runs on transformers 5, so the
library's own forward runs in its own venv (same CPU torch 2.13 wheel). It is built once per
machine under the cache folder ($PEFT_EXPORT_CACHE/venvs, else ~/.cache/peft-export/venvs;
`PEFT_EXPORT_ADAPTERS_VENV` names the venv itself) and reused;
two pytest workers take turns on a lock file. Where it cannot be built the tests skip, and
fail under CI=true. `.build-seconds` in the venv records how long building it took.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ADAPTERS_VERSION = "1.3.0"
TORCH_VERSION = "2.13.0"
VENV_ENV = "PEFT_EXPORT_ADAPTERS_VENV"
BUILD_TIMEOUT_S = 1200


def venv_dir() -> Path:
    override = os.environ.get(VENV_ENV)
    if override:
        return Path(override)
    cache = os.environ.get("PEFT_EXPORT_CACHE")
    root = Path(cache) if cache else Path.home() / ".cache" / "peft-export"
    return root / "venvs" / f"adapters-{ADAPTERS_VERSION}-torch-{TORCH_VERSION}"


def adapters_python() -> Path:
    """The venv's python, building the venv first if needed (skip or fail where impossible)."""
    root = venv_dir()
    python = root / "bin" / "python"
    done = root / ".build-seconds"
    if done.is_file():
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            _build(root, python, done)
    return python


def _build(root: Path, python: Path, done: Path) -> None:
    start = time.monotonic()
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(root)],
        [
            str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
            f"torch=={TORCH_VERSION}", f"adapters=={ADAPTERS_VERSION}",
        ],
    ]  # fmt: skip
    for step in steps:
        try:
            result = subprocess.run(
                step, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            _unavailable(f"building the adapters venv timed out: {' '.join(step[:4])}")
        if result.returncode != 0:
            _unavailable(f"building the adapters venv failed: {result.stderr.strip()[-500:]}")
    done.write_text(f"{time.monotonic() - start:.1f}\n")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


def run_in_venv(script: Path, *args: str, timeout: float = 600) -> None:
    """Run a reference script with the venv's python; its stderr tail is the failure message."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [str(adapters_python()), str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"{script.name} failed in the adapters venv:\n{result.stderr[-3000:]}")
