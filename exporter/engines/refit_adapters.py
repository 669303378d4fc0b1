"""`adapters add|remove` on a merged bundle: refit sets that swap the merged adapter.

A merged bundle's weights hold one adapter. Another LoRA-family adapter is served by refitting
the engine's projection weights to base + that adapter, so a set is computed with PEFT's own
merge against the base model the bundle came from (checked by the manifest's weights hash):
the refit set holds exactly what a merged export of that adapter would hold. The first add
also writes a set for the export-time adapter, so a refitted engine can go back to it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from peft_export.bundle import names
from peft_export.bundle.atomic import staged_update, write_text
from peft_export.bundle.manifest import InstalledAdapter, Manifest
from peft_export.bundle.paths import confined
from peft_export.exporter.adapter_source import (
    check_fits,
    check_new_adapter_name,
    read_adapter,
    uninstall,
)
from peft_export.exporter.bundle_files import file_sha256, read_manifest
from peft_export.exporter.engines import refit
from peft_export.exporter.errors import ExportError
from peft_export.exporter.merge import check_mergeable, merge_adapter


def add_refit_adapter(
    bundle_dir: str | Path,
    name: str,
    peft_dir: str | Path,
    *,
    base: str | None = None,
    replace: bool = False,
) -> InstalledAdapter:
    """Write engines/refit/NAME.safetensors for a merged bundle and record it in the manifest.

    `base` overrides the manifest's base-model source (a moved folder); either way its
    weights must hash to the manifest's `weights_sha256`.
    """
    root = Path(bundle_dir)
    manifest = load_merged_manifest(root)
    check_new_adapter_name(name, manifest.adapters.installed, replace=replace)
    source = read_adapter(peft_dir, name=name)
    check_mergeable(source)
    model = _checked_base(manifest, base)
    check_fits(source, model)
    base_weights = _numpy_state(model)
    merged_weights = _numpy_state(merge_adapter(copy.deepcopy(model), source))
    with staged_update(root) as stage:
        manifest = load_merged_manifest(root)
        check_new_adapter_name(name, manifest.adapters.installed, replace=replace)
        merged = manifest.adapters.merged or {}
        exported = merged.get("name")
        if exported in manifest.adapters.installed or exported == name:
            exported = None
        metadata = {"method": source.method, "source": str(source.path)}
        written = refit.write_refit_set(
            stage, name, base_weights, merged_weights, metadata=metadata, export_name=exported
        )
        if not written:
            raise ExportError(
                f"adapter {name} changes no projection weight of this base; check that it was "
                "trained on this base model"
            )
        if exported and confined(stage, names.refit_file(exported)).is_file():
            _record(stage, manifest, exported, str(merged["method"]))
        _record(stage, manifest, name, source.method)
        write_text(stage / names.MANIFEST, manifest.to_json())
    return manifest.adapters.installed[name]


def remove_refit_adapter(bundle_dir: str | Path, name: str) -> None:
    """Drop a refit set; the bundle changes as one step, like `add_refit_adapter`."""
    root = Path(bundle_dir)
    load_merged_manifest(root)
    with staged_update(root) as stage:
        uninstall(stage, load_merged_manifest(root), name)


def load_merged_manifest(root: Path) -> Manifest:
    manifest = read_manifest(root)
    if manifest.mode != "merged":
        raise ExportError(f"{root} is a {manifest.mode}-mode bundle, not a merged one")
    return manifest


def _checked_base(manifest: Manifest, base: str | None) -> object:
    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.bundle_writer import weights_sha256

    source = base or manifest.base_model.source
    if source == "in-memory":
        raise ExportError(
            "this bundle was exported from an in-memory model, so its base cannot be reloaded; "
            "pass --base with the base model's folder or name"
        )
    model = load_base(source).model
    if weights_sha256(model) != manifest.base_model.weights_sha256:
        raise ExportError(
            f"base model {source!r} is not the one this bundle was exported from (weights hash "
            "differs); pass --base with the original base model"
        )
    return model


def _numpy_state(model: object) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def _record(stage: Path, manifest: Manifest, name: str, method: str) -> None:
    file = names.refit_file(name)
    digest = file_sha256(confined(stage, file))
    manifest.adapters.installed[name] = InstalledAdapter(file=file, method=method, sha256=digest)
