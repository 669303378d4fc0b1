"""An existing bundle as the exporter's commands read it: its manifest, its files' hashes.

Bundle-layer errors become ExportError here, so `adapters`, refit and prompt-side code share
one conversion instead of each wrapping `load_manifest`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from peft_export.bundle.errors import BundleError
from peft_export.bundle.manifest import Manifest, load_manifest
from peft_export.exporter.errors import ExportError


def read_manifest(root: str | Path) -> Manifest:
    try:
        return load_manifest(root)
    except BundleError as exc:
        raise ExportError(str(exc)) from None


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (adapter files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
