"""Installing and removing converted adapter files in a loaded bundle, without torch.

A converted file is a peft-export adapter `.safetensors` (graph layout, made for this bundle's
base by `peft-export adapters add` or an in-process converter). It is copied into a staged
copy of the bundle, checked there against the banks or prompt-side bounds, and the manifest
entry is written beside it; the bundle then changes in one rename (bundle/atomic.py), so a
refused file leaves it as it was. The running scheduler sees the change through the
manifest's mtime, as it sees `peft-export adapters add`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from peft_export.bundle import names
from peft_export.bundle.atomic import staged_file, staged_update, write_text
from peft_export.bundle.errors import BundleError
from peft_export.bundle.lora_methods import LORA_METHODS
from peft_export.bundle.manifest import InstalledAdapter, load_manifest
from peft_export.bundle.paths import confined
from peft_export.bundle.safetensors_io import SafetensorsReader, check_finite
from peft_export.runtime.adapter_store import AdapterStore, check_adapter_header
from peft_export.runtime.errors import InferenceError, UnknownAdapterError
from peft_export.runtime.prompt_inputs import MAX_ADAPTER_BYTES, check_prompt_shapes

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or names.reserved_adapter_name(name):
        raise InferenceError(
            f"adapter name {name!r} is not usable: use 1-128 letters, digits, '_', '-' or '.', "
            "not starting with '.' or '-', and none of the bundle's own file names"
        )


def install(
    root: Path,
    files: Mapping[str, Path],
    *,
    replace: bool,
    accepted: Collection[str],
    store: AdapterStore | None,
) -> dict[str, str]:
    """Install each `files[name]` as adapter `name` of the bundle at `root`, all in one
    bundle update (all or none); returns each name's method."""
    for name, path in files.items():
        check_name(name)
        if not Path(path).is_file():
            raise InferenceError(f"{path}: not a file; pass a converted peft-export adapter file")
    methods = {}
    try:
        with staged_update(root) as stage:
            manifest = load_manifest(stage)
            for name, path in files.items():
                if name in manifest.adapters.installed and not replace:
                    raise InferenceError(
                        f"the bundle already has an adapter {name!r}; unregister it first, "
                        "pass replace=True, or pick another name"
                    )
                with staged_file(stage / names.adapter_file(name)) as tmp:
                    shutil.copyfile(path, tmp)
                    method, rank, digest = _check_file(tmp, manifest, name, accepted, store)
                manifest.adapters.installed[name] = InstalledAdapter(
                    file=names.adapter_file(name), method=method, rank=rank, sha256=digest
                )
                methods[name] = method
            write_text(stage / names.MANIFEST, manifest.to_json())
    except BundleError as exc:
        raise InferenceError(str(exc)) from None
    return methods


def _check_file(path, manifest, name, accepted, store) -> tuple[str, int, str]:
    with SafetensorsReader(path, max_total_bytes=MAX_ADAPTER_BYTES) as reader:
        header = reader.header
        meta = header.metadata
        method = meta.get("method", "")
        if meta.get("format") != names.ADAPTER_FILE_FORMAT or method not in accepted:
            raise InferenceError(
                f"adapter {name!r}: not a converted adapter this bundle serves (format "
                f"{meta.get('format')!r}, method {method!r}; accepted: "
                f"{', '.join(sorted(accepted))}); convert it for this bundle first"
            )
        if method in LORA_METHODS:
            assert store is not None
            check_adapter_header(path, header, manifest, name, store.dtype, store.specs)
        tensors, digest = reader.read_all()
    check_finite(path, tensors)
    if method not in LORA_METHODS:
        if meta.get("base_weights_sha256") != manifest.base_model.weights_sha256:
            raise InferenceError(
                f"adapter {name!r} was converted for another base model (weights hash "
                "differs); convert it for this bundle"
            )
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
        check_prompt_shapes(name, method, arrays, manifest)
    rank = meta.get("rank", "0")
    return method, int(rank) if rank.isdigit() else 0, digest


def uninstall(root: Path, name: str) -> None:
    """Remove adapter `name` (its manifest entry and file) in one step."""
    with staged_update(root) as stage:
        manifest = load_manifest(stage)
        entry = manifest.adapters.installed.pop(name, None)
        if entry is None:
            raise UnknownAdapterError(f"the bundle has no adapter {name!r}; nothing to remove")
        write_text(stage / names.MANIFEST, manifest.to_json())
        confined(stage, entry.file).unlink(missing_ok=True)
