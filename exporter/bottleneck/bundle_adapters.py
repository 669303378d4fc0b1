"""`adapters add` for bottleneck adapters: convert a saved folder against the manifest alone.

The bundle's `adapters.bottleneck` layout (sites, width, activations) is all the conversion
needs, so adding takes seconds and never re-exports; the bundle changes as one staged step,
and every check runs before the first write. On an encoder bundle the head the library saved
beside the adapter fills its head-bank slot (without one it serves the base's head and labels).
"""

from __future__ import annotations

import json
from pathlib import Path

from peft_export.bundle import names
from peft_export.bundle.atomic import staged_update, write_text
from peft_export.bundle.manifest import InstalledAdapter, Manifest
from peft_export.exporter.adapter_source import check_new_adapter_name
from peft_export.exporter.bottleneck.convert import convert_bottleneck, fit_layout
from peft_export.exporter.bottleneck.folder import check_config, read_bottleneck, refuse_saved_head
from peft_export.exporter.bundle_files import read_manifest
from peft_export.exporter.errors import ExportError
from peft_export.exporter.runtime_adapters.bundle_adapters import install_converted
from peft_export.exporter.runtime_adapters.convert import SlotTensors
from peft_export.models.architectures import get_arch


def add_bottleneck_adapter(
    bundle_dir: str | Path, name: str, folder: str | Path, *, replace: bool = False
) -> InstalledAdapter:
    """Install a saved bottleneck adapter into a runtime bundle that has bottleneck banks."""
    root = Path(bundle_dir)
    with staged_update(root) as stage:
        manifest = read_manifest(root)
        layout = manifest.adapters.bottleneck
        if manifest.mode != "runtime" or layout is None:
            raise ExportError(
                f"{root} has no bottleneck banks; re-export it in runtime mode with a "
                "bottleneck adapter or with --bottleneck-sites all --bottleneck-size N"
            )
        check_new_adapter_name(name, manifest.adapters.installed, replace=replace)
        source = read_bottleneck(folder, name=name)
        if manifest.encoder is None:
            refuse_saved_head(source)
        spec = get_arch(manifest.base_model.architecture)
        base_config = manifest.base_model.config
        check_config(source.path, source.config, spec, base_config)
        converted = convert_bottleneck(
            source, spec, spec.hidden_size(base_config), spec.num_layers(base_config)
        )
        fitted = fit_layout(converted, layout)
        metadata = None
        if manifest.encoder is not None:
            metadata = _encoder_head(fitted, Path(folder), manifest)
        install_converted(
            stage,
            manifest.adapters,
            fitted,
            weights_sha256=manifest.base_model.weights_sha256,
            precision=manifest.precision,
            metadata=metadata,
        )
        write_text(stage / names.MANIFEST, manifest.to_json())
    return manifest.adapters.installed[name]


def _encoder_head(fitted: SlotTensors, folder: Path, manifest: Manifest) -> dict[str, str]:
    """Encoder bundles: the library's saved task head goes into the adapter's head-bank slot
    (none: the base's head); returns the labels header entry."""
    from peft_export.exporter.encoders.base import read_labels
    from peft_export.exporter.encoders.bottleneck import added_head
    from peft_export.exporter.encoders.export import LABELS_METADATA

    tensors, count = added_head(fitted.name, folder, manifest)
    fitted.tensors.update(tensors)
    labels = read_labels(folder, count) if count else manifest.encoder.labels
    return {LABELS_METADATA: json.dumps(labels)}
