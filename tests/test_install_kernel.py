"""A MultiLoRA CPU kernel that was not built is loud: install.sh's kernel step warns on
stderr with the reason and the fix (an error under CI=true), and the kernel's tests fail in
CI instead of skipping.

scripts/install_cpu_kernel.sh runs from a copy of the scripts folder whose
build_cpu_kernel.sh is a stand-in written here (it fails, or writes nothing, or writes the
library), so no real build or download happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import cpu_kernel
import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "plugins/multilora/build/libpeft_multilora_ort.so"
TOOLS = ("bash", "dirname", "mktemp", "rm", "grep", "tail", "tr", "mkdir", "touch", "cat")


def _repo(tmp_path: Path, build_script: str) -> Path:
    """A repo folder with the real install step and a stand-in build script."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "install_cpu_kernel.sh", repo / "scripts")
    build = repo / "scripts" / "build_cpu_kernel.sh"
    build.write_text('#!/usr/bin/env bash\ncd "$(dirname "$0")/.."\n' + build_script)
    build.chmod(0o755)
    return repo


def _path(tmp_path: Path, compilers: bool) -> str:
    """A PATH with the shell tools the step uses, and cmake and c++ only if `compilers`."""
    bin_dir = tmp_path / ("bin-with" if compilers else "bin-without")
    bin_dir.mkdir()
    for tool in ("env", *TOOLS):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if compilers:
        for tool in ("cmake", "c++"):
            (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
            (bin_dir / tool).chmod(0o755)
    return str(bin_dir)


def _install_step(repo: Path, path: str, ci: str | None) -> subprocess.CompletedProcess:
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        ["bash", str(repo / "scripts" / "install_cpu_kernel.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


FAILING_BUILD = (
    "echo 'CMake Error at CMakeLists.txt:60 (message):' >&2\n"
    "echo '  PEFT_MULTILORA_ORT=ON but onnxruntime_cxx_api.h was not found' >&2\n"
    "exit 1\n"
)


def _warning(stderr: str) -> str:
    (line,) = [x for x in stderr.splitlines() if x.startswith("WARNING:")]
    return line


def test_failed_build_warns_with_reason_and_fix(tmp_path):
    done = _install_step(_repo(tmp_path, FAILING_BUILD), _path(tmp_path, True), ci=None)
    assert done.returncode == 0
    line = _warning(done.stderr)
    assert "onnxruntime_cxx_api.h was not found" in line  # the reason
    assert "function body instead (slower)" in line  # what users get
    assert "Fix: run scripts/build_cpu_kernel.sh" in line
    assert "WARNING" not in done.stdout


def test_missing_compilers_warn_with_the_fix(tmp_path):
    done = _install_step(_repo(tmp_path, "exit 0\n"), _path(tmp_path, False), ci="false")
    assert done.returncode == 0
    line = _warning(done.stderr)
    assert "cmake not found" in line and "Fix: install cmake and a C++17 compiler" in line


def test_build_without_the_library_warns(tmp_path):
    done = _install_step(_repo(tmp_path, "exit 0\n"), _path(tmp_path, True), ci=None)
    assert done.returncode == 0
    assert f"did not write {LIBRARY}" in _warning(done.stderr)


@pytest.mark.parametrize("compilers", [True, False], ids=["build-fails", "no-cmake"])
def test_ci_fails_the_install(tmp_path, compilers):
    done = _install_step(_repo(tmp_path, FAILING_BUILD), _path(tmp_path, compilers), ci="true")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("ERROR: the MultiLoRA CPU kernel was not built")


def test_built_library_is_quiet(tmp_path):
    build = f"mkdir -p $(dirname {LIBRARY}) && touch {LIBRARY}\n"
    done = _install_step(_repo(tmp_path, build), _path(tmp_path, True), ci="true")
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr and "ERROR" not in done.stderr
    assert LIBRARY in done.stdout


def _outcome(build_dir: Path) -> type[BaseException]:
    with pytest.raises(BaseException) as info:
        cpu_kernel.build_cpu_kernel(build_dir)
    return info.type


def test_kernel_tests_fail_instead_of_skipping_in_ci(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda _name: None)
    monkeypatch.setenv("CI", "true")
    assert _outcome(tmp_path) is pytest.fail.Exception
    monkeypatch.delenv("CI")
    assert _outcome(tmp_path) is pytest.skip.Exception


def test_kernel_tests_fail_in_ci_when_the_headers_were_missing(tmp_path, monkeypatch):
    """The build ran but wrote no library (CMake's AUTO mode found no ONNX Runtime headers)."""

    def no_library(*args, **kwargs):
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cpu_kernel.subprocess, "run", no_library)
    monkeypatch.setenv("CI", "true")
    assert _outcome(tmp_path) is pytest.fail.Exception
    monkeypatch.setenv("CI", "0")
    assert _outcome(tmp_path) is pytest.skip.Exception
