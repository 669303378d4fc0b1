"""Engine cache: a rebuild of the same graph for the same targets is a file copy.

The key covers everything the engine depends on: the ONNX bytes (and its external data),
the profiles, the precision, the TensorRT flavour and version, the target compute
capabilities and the build flags. Entries are written atomically, so concurrent builds of
the same key at worst both build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from peft_export.bundle.atomic import staged_file
from peft_export.bundle.paths import confined

CACHE_ENV = "PEFT_EXPORT_CACHE"
_CHUNK = 16 * 1024 * 1024


def cache_root() -> Path:
    """$PEFT_EXPORT_CACHE/engines, else ~/.cache/peft-export/engines."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base) / "engines"
    return Path.home() / ".cache" / "peft-export" / "engines"


def cache_key(**parts: Any) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def onnx_sha256(onnx_path: Path) -> str:
    """Hash of the graph file and every external data file it references, in order."""
    digest = hashlib.sha256()
    for path in [onnx_path, *_external_data_files(onnx_path)]:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _external_data_files(onnx_path: Path) -> list[Path]:
    """External data files of the graph; a location leaving its folder is refused (BundleError)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    locations: set[str] = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return [confined(onnx_path.parent, loc) for loc in sorted(locations)]


def _all_tensors(graph: Any) -> list[Any]:
    tensors = list(graph.initializer)
    for node in graph.node:
        tensors += [attr.t for attr in node.attribute if attr.HasField("t")]
    return tensors


class EngineCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.plan"

    def lookup(self, key: str) -> Path | None:
        path = self.path(key)
        return path if path.is_file() else None

    def store(self, key: str, engine: bytes | memoryview) -> Path:
        path = self.path(key)
        with staged_file(path) as tmp:
            tmp.write_bytes(engine)
        return path

    def copy_to(self, key: str, target: Path) -> bool:
        """Copy a cached engine to `target` (atomically); False on a miss."""
        source = self.lookup(key)
        if source is None:
            return False
        with staged_file(target) as tmp:
            shutil.copyfile(source, tmp)
        return True
