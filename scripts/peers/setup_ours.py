"""peft-export's sides: bundles written by the `peft-export export` CLI, one per side, and the
PyTorch + PEFT reference (nothing to build). Both run in the project's own interpreter.

Side names: ours_{merged|runtime}_{fp32|int8|int4}[_fused] -> `export --mode merged|runtime
[--quantize int8|int4] [--ort-fusions cpu]`. A bundle is re-exported when the command or the
project's code (git HEAD plus uncommitted changes of the checkout `peft_export` is imported
from, which PYTHONPATH may point at) differs from the one it was made with. Quantized sides
are skipped, not failed, while the CLI has no --quantize.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

from setup_common import SetupError, SideSkipped, SideSpec, run_logged, stamp_matches, write_stamp

NAME = re.compile(r"^ours_(merged|runtime)_(fp32|int8|int4)(_fused)?$")
CLI = [sys.executable, "-c", "from peft_export.exporter.cli import main; main()"]
SOURCE_DIRS = ["exporter", "bundle", "models", "runtime", "plugins", "peft_export"]


def is_ours(name: str) -> bool:
    return NAME.match(name) is not None


def setup(name: str, workdir: Path, adapter: Path, threads: int) -> SideSpec:
    match = NAME.match(name)
    if match is None:
        raise SetupError(f"unknown side {name!r}")
    mode, precision, fused = match.group(1), match.group(2), bool(match.group(3))
    args = ["--base", "smollm2-135m", "--adapter", f"pirate={adapter}", "--mode", mode]
    if fused:
        args += ["--ort-fusions", "cpu"]
    if precision != "fp32":
        if not quantize_available():
            raise SideSkipped("--quantize not available")
        args += ["--quantize", precision]
    out = workdir / "ours" / name
    key = " ".join(args) + " " + code_version()
    if not stamp_matches(out, key):
        run_logged(
            [*CLI, "export", *args, "--out", out, "--force"], workdir / "ours" / "export.log"
        )
        write_stamp(out, key)
    return SideSpec(
        name=name,
        peer="peft-export",
        precision=precision,
        python=sys.executable,
        module="side_ours",
        config={
            "bundle": str(out),
            "adapter": "pirate" if mode == "runtime" else None,
            "threads": threads,
        },
        files=[out],
        settings={
            "build": "peft-export export " + " ".join(args).replace(str(adapter), "…"),
            "code": f"{package_repo()} @ {code_version()}",
        },
        env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )


def setup_torch(workdir: Path, checkpoint: Path, adapter: Path, threads: int) -> SideSpec:
    """The reference: the HF checkpoint + the PEFT adapter, unmerged, fp32."""
    return SideSpec(
        name="torch_peft_fp32",
        peer="pytorch+peft",
        precision="fp32",
        python=sys.executable,
        module="side_torch",
        config={"checkpoint": str(checkpoint), "adapter": str(adapter), "threads": threads},
        files=[checkpoint, adapter],
        settings={"build": "AutoModelForCausalLM + PeftModel.from_pretrained (unmerged)"},
    )


def quantize_available() -> bool:
    """Whether this checkout's `export` has --quantize (the flag is being added)."""
    result = subprocess.run([*CLI, "export", "--help"], capture_output=True, text=True)
    return result.returncode == 0 and "--quantize" in result.stdout


def package_repo() -> Path:
    """The checkout the CLI subprocess imports peft_export from (same environment as ours)."""
    import peft_export

    return Path(peft_export.__file__).resolve().parents[1]


def code_version() -> str:
    """HEAD plus a digest of uncommitted changes to the package's sources."""

    def git(*args: str) -> str:
        repo = str(package_repo())
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    head = git("rev-parse", "HEAD").strip() or "no-git"
    dirty = git("diff", "HEAD", "--", *SOURCE_DIRS)
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *SOURCE_DIRS)
    digest = hashlib.sha256((dirty + untracked).encode()).hexdigest()[:12]
    return f"{head}+{digest}"
