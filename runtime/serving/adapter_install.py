"""POST /v1/adapters: convert a PEFT folder (numpy, no torch) and hand the file to the engine,
whose registry installs it into the bundle atomically."""

from __future__ import annotations

import tempfile
from pathlib import Path

from peft_export.bundle.manifest import load_manifest
from peft_export.runtime.serving.engine import Engine
from peft_export.runtime.serving.peft_convert import convert_folder


def convert_to_file(engine: Engine, name: str, folder: Path, replace: bool) -> str:
    """Install the adapter in `folder` as `name`; returns its method."""
    root = engine.bundle.root
    with tempfile.TemporaryDirectory(prefix="peft-export-adapter-") as tmp:
        out = Path(tmp) / f"{name}.safetensors"
        convert_folder(root, load_manifest(root), name, folder, out)
        return engine.register(name, out, replace=replace)
