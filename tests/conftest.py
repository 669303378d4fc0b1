"""Shared test set-up: make tests/ importable for helper modules; session-wide builds."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Tests send traffic to loopback only: no Hugging Face library may look anything up on the Hub
# (PEFT checks a base model's name there when it loads an adapter; here that was a DNS lookup).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def cpu_kernel_library(tmp_path_factory) -> Path:
    """libpeft_multilora_ort.so: install.sh's when current, else built once per test process;
    skips where it cannot be built."""
    from cpu_kernel import build_cpu_kernel, installed_cpu_kernel

    installed = installed_cpu_kernel()
    return installed or build_cpu_kernel(tmp_path_factory.mktemp("multilora-ort-build"))
