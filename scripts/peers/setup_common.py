"""What every peer's setup shares: logged subprocesses, virtualenvs, stamps, the side record.

Setups cache everything under the bench's --workdir and are idempotent: a finished step
writes a stamp holding the inputs it was made from, and is skipped while the stamp matches.
Nothing here is imported by the worker processes (they may run another interpreter).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "0"}


HEAD_8BIT = "int4, 8-bit head"
"""The precision class of an int4 side whose output head (SmolLM2's tied token table) is
8-bit: llama.cpp's Q4_0 (llama-quantize keeps it Q8_0), OpenVINO's int4 (nncf's int8 backup
precision) and our bundle from the GGUF (its own Q8_0 table). A 4-bit head (onnxruntime-genai's
builder) reads ~14 MB less per token, so the two classes are compared apart."""


def int4_class(head_bits: int) -> str:
    """The precision class of an int4 side from its head's bit width."""
    return (
        "int4" if head_bits == 4 else HEAD_8BIT if head_bits == 8 else f"int4, {head_bits}-bit head"
    )


class SetupError(RuntimeError):
    """A peer could not be installed, built or converted (the side fails)."""


class SideSkipped(RuntimeError):
    """A side cannot run here for a known reason that is not a failure (it is reported)."""


@dataclass
class SideSpec:
    """How the controller starts one side's worker, and what the report says about it."""

    name: str
    peer: str
    precision: str
    python: str
    module: str
    config: dict
    files: list[Path]
    """Model files the side loads (bytes on disk are summed over these, folders recursively)."""
    settings: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    ftz: bool = False
    """Set FTZ/DAZ in the worker's main thread before loading (its threads inherit it): for
    runtimes without a setting of their own."""


def run_logged(cmd: list[str], log: Path, *, env: dict | None = None, cwd: Path | None = None):
    """Run `cmd` with output appended to `log`; on failure raise with the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        result = subprocess.run(
            [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SetupError(f"{cmd[0]} ... exited {result.returncode} (log {log}):\n{tail}")


def venv_python(folder: Path, requirements: list[str], log: Path, *, after: list[str] = ()) -> str:
    """A virtualenv at `folder` (system site-packages visible: numpy, torch, transformers are
    reused, so only the peer's own packages land in it) with `requirements` installed.
    `after`: packages to uninstall again (unwanted extras a peer's dependencies drag in)."""
    python = folder / "bin" / "python"
    key = json.dumps({"requirements": requirements, "after": list(after)})
    if stamp_matches(folder, key):
        return str(python)
    if not python.exists():
        run_logged([sys.executable, "-m", "venv", "--system-site-packages", folder], log)
    # Keep the project's torch: a peer's looser pin would otherwise pull a CUDA build.
    constraints = folder / "constraints.txt"
    constraints.write_text(f"torch=={_installed('torch')}\n" if _installed("torch") else "")
    run_logged([python, "-m", "pip", "install", "-c", constraints, *requirements], log)
    if after:
        run_logged([python, "-m", "pip", "uninstall", "-y", *after], log)
    write_stamp(folder, key)
    return str(python)


def _installed(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def stamp_matches(folder: Path, key: str) -> bool:
    stamp = folder / ".peers-stamp"
    return stamp.is_file() and stamp.read_text() == key


def write_stamp(folder: Path, key: str) -> None:
    (folder / ".peers-stamp").write_text(key)


def file_digest(path: Path) -> str:
    """Short content hash: stamps of conversions name the exact adapter/checkpoint used."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def files_under(paths: list[Path]) -> list[Path]:
    """The files among `paths`, folders searched recursively."""
    found = []
    for path in paths:
        found += sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return [f for f in found if f.is_file()]


def bytes_on_disk(paths: list[Path]) -> int:
    return sum(f.stat().st_size for f in files_under(paths))


def read_through(paths: list[Path]) -> None:
    """Read every file under `paths` once and drop the bytes: the page cache then holds them
    for the load that follows, whatever ran before (an export writing gigabytes evicts a
    peer's GGUF, whose next load came from disk: llama.cpp Q8_0 0.58 instead of 0.22 s)."""
    for file in files_under(paths):
        with file.open("rb") as handle:
            while handle.read(1 << 23):
                pass


def build_ftz_helper(workdir: Path) -> Path | None:
    """Compile scripts/peers/ftz.c into the workdir (once); None without a C compiler."""
    folder = workdir / "ftz"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "libpeers_ftz.so"
    source = HERE / "ftz.c"
    key = file_digest(source)
    if out.is_file() and stamp_matches(folder, key):
        return out
    try:
        subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", str(out), str(source)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    write_stamp(folder, key)
    return out
