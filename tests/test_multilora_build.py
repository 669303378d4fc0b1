"""Build the MultiLoRA libraries with CMake (nvcc, no GPU needed) and check their surface.

CI has nvcc but no GPU: it builds the kernels library for one architecture (sm_86, to keep
the compile short), checks the exported C ABI through nm and ctypes (the calls used here
stop before touching CUDA), and drives the Python loaders. The TensorRT plugin is built too
where TENSORRT_ROOT (or a system TensorRT) provides the headers.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cpu_kernel import cmake_build

from peft_export import plugins
from peft_export.plugins import _library

PREBUILT_ENV = "PEFT_EXPORT_MULTILORA_BUILD"
"""A build folder .ci/run made before the suite (same cmake options): CI builds the kernels
outside the suite's two concurrent workers, where their link failed twice on 2026-12-07."""
C_ABI = {
    "peft_multilora_abi_version",
    "peft_multilora_workspace_size",
    "peft_multilora_forward",
    "peft_multilora_forward_path",
    "peft_multilora_status_string",
}


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get(PREBUILT_ENV)
    if given:
        return Path(given)
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("nvcc and cmake are needed to build the MultiLoRA kernels")
    build = tmp_path_factory.mktemp("multilora-build")
    subprocess.run(
        ["cmake", "-S", str(_library.SOURCE_DIR), "-B", str(build),
         "-DCMAKE_CUDA_ARCHITECTURES=86", "-DCMAKE_BUILD_TYPE=Release"],
        check=True,
    )  # fmt: skip
    cmake_build(build)
    return build


@pytest.fixture
def fresh_loader() -> Iterator[None]:
    """load_kernels() caches its library; tests that move the search path start clean."""
    plugins.load_kernels.cache_clear()
    yield
    plugins.load_kernels.cache_clear()


def _exported(path: Path) -> set[str]:
    if shutil.which("nm") is None:
        pytest.skip("nm is needed to list exported symbols")
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_kernels_library_exports_only_the_c_abi(build_dir: Path) -> None:
    lib_path = build_dir / plugins.KERNELS_LIBRARY
    assert lib_path.is_file()
    assert {s for s in _exported(lib_path) if not s.startswith("_")} == C_ABI


def test_c_abi_answers_without_a_gpu(
    build_dir: Path, monkeypatch: pytest.MonkeyPatch, fresh_loader: None
) -> None:
    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(build_dir))
    lib = plugins.load_kernels()
    assert lib.peft_multilora_abi_version() == 1
    size = plugins.workspace_size(8, 512, 4096, 4096, 64, 9)
    assert size == lib.peft_multilora_workspace_size(8, 512, 4096, 4096, 64, 9)
    assert size >= 8 * 512 * 64 * 4  # at least one fp32 partial sum per token and rank
    assert plugins.workspace_size(16, 512, 4096, 4096, 64, 9) >= size
    # Argument checks come before any CUDA call.
    null = ctypes.c_void_p(0)
    args = (null, null, null, null, 2, 1, 8, 8, 4, 2, null, null, 0, null)
    assert lib.peft_multilora_forward_path(7, *args, 0) == 1  # unknown dtype
    assert lib.peft_multilora_forward_path(0, *args, 9) == 1  # unknown path
    assert b"workspace" in lib.peft_multilora_status_string(2)


def test_missing_library_says_how_to_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(tmp_path))
    with pytest.raises(plugins.PluginError, match="cmake -S .*PEFT_EXPORT_PLUGIN_DIR"):
        plugins.find_library("libpeft_multilora_missing.so")


class _FakeRegistry:
    """The two calls load_trt_plugin makes on tensorrt's IPluginRegistry."""

    def __init__(self, registers: bool) -> None:
        self.registers = registers
        self.loaded: list[str] = []
        self.creators: dict[tuple[str, str, str], Any] = {}

    def get_creator(self, name: str, version: str, namespace: str) -> Any:
        return self.creators.get((name, version, namespace))

    def load_library(self, path: str) -> object:
        self.loaded.append(path)
        if self.registers:
            self.creators[("MultiLoRA", "1", "peft_export")] = object()
        return object()


def test_load_trt_plugin_registers_once(
    build_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without TensorRT the registry is faked; any loadable library stands in for the plugin.
    stand_in = tmp_path / plugins.PLUGIN_LIBRARY
    shutil.copy(build_dir / plugins.KERNELS_LIBRARY, stand_in)
    monkeypatch.setenv(plugins.PLUGIN_DIR_ENV, str(tmp_path))
    registry = _FakeRegistry(registers=True)
    trt = types.SimpleNamespace(get_plugin_registry=lambda: registry)
    assert plugins.load_trt_plugin(trt) == stand_in
    assert plugins.load_trt_plugin(trt) == stand_in
    assert registry.loaded == [str(stand_in)]

    silent = _FakeRegistry(registers=False)
    with pytest.raises(plugins.PluginError, match="no peft_export::MultiLoRA"):
        plugins.load_trt_plugin(types.SimpleNamespace(get_plugin_registry=lambda: silent))


def test_plugin_library_when_tensorrt_headers_exist(build_dir: Path) -> None:
    plugin = build_dir / plugins.PLUGIN_LIBRARY
    if not plugin.is_file():
        pytest.skip("no TensorRT >= 10 headers (set TENSORRT_ROOT) so no libpeft_multilora.so")
    assert {"getCreators", "setLoggerFinder"} | C_ABI <= _exported(plugin)
    subprocess.run(["ctest", "--output-on-failure"], cwd=build_dir, check=True)
