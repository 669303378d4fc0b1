"""peft-export's sides: bundles written by the `peft-export export` CLI, one per side, and the
PyTorch + PEFT reference (nothing to build). Both run in the project's own interpreter.

Side names: ours_{merged|runtime}_{fp32|int8|int4|int4h4}[_fused][_cpp] -> `export --mode
merged|runtime [--quantize int8|int4] [--ort-fusions cpu]` (int4h4: `--quantize int4
--quant-head int4`; plain int4 keeps the GGUF's own Q8_0 head, and the side's precision class
says which head it has); `_cpp` runs the same bundle through
the C++ runtime (runtime/cpp, built once under the workdir) instead of the Python one. A
bundle is re-exported when the command differs from the one it was made with, or the
exporter's code does (the git trees of the export-time folders plus their uncommitted changes,
in the checkout `peft_export` is imported from, which PYTHONPATH may point at);
`reuse=True` (--reuse-exports) keeps a bundle made by the same command with other code and
says so. Quantized sides are skipped, not failed, while the CLI has no --quantize.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from setup_common import SetupError, SideSkipped, SideSpec, int4_class, run_logged, write_stamp

NAME = re.compile(r"^ours_(merged|runtime)_(fp32|int8|int4|int4h4)(_fused)?(_cpp)?$")
CLI = [sys.executable, "-c", "from peft_export.exporter.cli import main; main()"]
EXPORT_DIRS = ["exporter", "bundle", "models", "plugins", "peft_export"]
"""What a bundle's contents depend on (runtime/ is not baked into bundles)."""


def is_ours(name: str) -> bool:
    return NAME.match(name) is not None


def setup(name: str, workdir: Path, adapter: Path, threads: int, reuse: bool = False) -> SideSpec:
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
        args += ["--quantize", precision.removesuffix("h4")]
        if precision == "int4h4":
            args += ["--quant-head", "int4"]
    out = workdir / "ours" / name.removesuffix("_cpp")
    code = code_version()
    made = _made_with(out)
    if made.get("args") != args or (made.get("code") != code and not reuse):
        run_logged(
            [*CLI, "export", *args, "--out", out, "--force"], workdir / "ours" / "export.log"
        )
        made = {"args": args, "code": code}
        write_stamp(out, json.dumps(made))
    exported_with = f"{package_repo()} exporter code {made['code']}"
    if made["code"] != code:
        exported_with += f" (reused; the checkout's is now {code})"
    config = {
        "bundle": str(out),
        "adapter": "pirate" if mode == "runtime" else None,
        "threads": threads,
    }
    settings = {
        "build": "peft-export export " + " ".join(args).replace(str(adapter), "…"),
        "exported_with": exported_with,
    }
    if match.group(4):
        config["library"] = str(build_cpp_runtime(workdir) / "libpeft_export_runtime.so")
        settings["runtime"] = "C++ (runtime/cpp, Release build)"
    if precision.startswith("int4"):
        precision = int4_class(_head_bits(out))
    return SideSpec(
        name=name,
        peer="peft-export",
        precision=precision,
        python=sys.executable,
        module="side_ours_cpp" if match.group(4) else "side_ours",
        config=config,
        files=[out],
        settings=settings,
        env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )


def _head_bits(bundle: Path) -> int:
    """The bit width of the bundle's output head (32: kept in float)."""
    record = json.loads((bundle / "manifest.json").read_text())["quantization"]
    return record["modules"].get("lm_head", {}).get("bits", 32)


def build_cpp_runtime(workdir: Path) -> Path:
    """runtime/cpp built (Release, incremental) from the checkout peft_export comes from."""
    repo = package_repo()
    build = workdir / "ours" / "cpp-build"
    log = workdir / "ours" / "cpp-build.log"
    run_logged([str(repo / "scripts" / "fetch_ort_headers.sh")], log)
    configure = ["cmake", "-S", str(repo / "runtime" / "cpp"), "-B", str(build)]
    configure += ["-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}"]
    run_logged(configure, log)
    build_cmd = ["cmake", "--build", str(build), "--target", "peft_export_runtime"]
    run_logged([*build_cmd, "-j", str(os.cpu_count() or 2)], log)
    return build


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


def _made_with(out: Path) -> dict:
    stamp = out / ".peers-stamp"
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}


def code_version() -> str:
    """The git trees of the export-time folders plus a digest of their uncommitted changes:
    commits elsewhere (docs, tests, the runtime) do not force a re-export."""

    def git(*args: str) -> str:
        repo = str(package_repo())
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    trees = git("rev-parse", *(f"HEAD:{folder}" for folder in EXPORT_DIRS)) or "no-git"
    dirty = git("diff", "HEAD", "--", *EXPORT_DIRS)
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *EXPORT_DIRS)
    return hashlib.sha256((trees + dirty + untracked).encode()).hexdigest()[:16]
