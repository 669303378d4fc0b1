"""Bottleneck adapters (AdapterHub `adapters`) on encoder bundles: the decoders' bottleneck
banks (exporter/bottleneck) on the family's post-LN sites (models/encoders.py).

The encoder's task model decides where the sites are: the family's paths name the base model
attribute (`bert.encoder.layer...`), which the bare base model (feature extraction) lacks.
Converted adapters join the encoder's other runtime adapters, so they get head-bank slots
and a labels header like any other. The library's training switch trains a transformers task
model's head with the adapter, and `save_adapter` saves it beside the adapter by default
(`model_head.safetensors`, parameter paths as the task model names them): that head becomes
the adapter's head-bank slot, as a PEFT `modules_to_save` head does; without one, the
adapter serves the base's head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from peft_export.bundle import bottleneck as bn
from peft_export.bundle import names, safetensors_io
from peft_export.bundle.errors import BundleError
from peft_export.bundle.manifest import Manifest
from peft_export.exporter.adapter_source import AdapterSource
from peft_export.exporter.bottleneck.banks import BottleneckBanks
from peft_export.exporter.bottleneck.convert import convert_bottleneck, fit_layout
from peft_export.exporter.bottleneck.folder import check_config
from peft_export.exporter.bottleneck.planner import OPTION_KEYS, bank_layout
from peft_export.exporter.encoders.heads import SplitAdapter
from peft_export.exporter.errors import ExportError
from peft_export.exporter.runtime_adapters.convert import SlotTensors
from peft_export.models.encoders import ENCODERS, EncoderSpec, get_encoder


def rooted(spec: EncoderSpec, model: nn.Module) -> EncoderSpec:
    """`spec` with its bottleneck paths relative to `model` (the task model or the bare base)."""
    prefix = f"{model.base_model_prefix}."
    if spec.bottleneck is None or isinstance(
        getattr(model, model.base_model_prefix, None), nn.Module
    ):
        return spec

    def strip(path: str | None) -> str | None:
        return path[len(prefix) :] if path and path.startswith(prefix) else path

    sites = {
        location: dataclasses.replace(
            attach,
            output=strip(attach.output),
            residual=strip(attach.residual),
            norm=strip(attach.norm),
        )
        for location, attach in spec.bottleneck.items()
    }
    return dataclasses.replace(spec, bottleneck=sites)


def plan_bottleneck(
    model: nn.Module,
    spec: EncoderSpec,
    sources: Sequence[AdapterSource],
    options: dict[str, Any],
    slots: int,
) -> tuple[BottleneckBanks | None, list[SlotTensors]]:
    """Bottleneck banks for `sources` (or for the bank options asked) and their slot tensors."""
    if not sources and not any(options.get(k) for k in OPTION_KEYS):
        return None, []
    if spec.bottleneck is None:
        have = ", ".join(sorted(k for k, v in ENCODERS.items() if v.bottleneck))
        raise ExportError(
            f"bottleneck adapters are not supported on {spec.model_type} encoders (supported: "
            f"{have}); add its `bottleneck` sites in models/encoders.py"
        )
    spec = rooted(spec, model)
    config = model.config
    hidden, num_layers = spec.hidden_size(config), spec.num_layers(config)
    for source in sources:
        check_config(source.path, source.config, spec, config)
    converted = [convert_bottleneck(s, spec, hidden, num_layers) for s in sources]
    layout = bank_layout(options, converted, spec, hidden, num_layers)
    banks = BottleneckBanks(spec, layout, slots=slots)
    return banks, [fit_layout(adapter, layout) for adapter in converted]


def is_bottleneck(source: AdapterSource) -> bool:
    return source.method == bn.METHOD


HEAD_WEIGHTS = "model_head.safetensors"
PICKLED_HEAD = "pytorch_model_head.bin"
_RESAVE = "save_adapter(DIR, NAME, use_safetensors=True)"


def read_library_head(name: str, folder: Path) -> dict[str, np.ndarray]:
    """The task head the library saved beside an adapter, by parameter path ({}: none)."""
    path = folder / HEAD_WEIGHTS
    if not path.is_file():
        if (folder / PICKLED_HEAD).is_file():
            raise ExportError(
                f"adapter {name}: its head has only pickled weights ({PICKLED_HEAD}), which are "
                f"never loaded; re-save it with {_RESAVE}"
            )
        return {}
    try:
        tensors = safetensors_io.read_tensors(path)
    except BundleError as exc:
        raise ExportError(f"adapter {name}: {exc}") from None
    flexible = [k for k in tensors if k.startswith("heads.")]
    if flexible:
        raise ExportError(
            f"adapter {name}: its head is a flexible head ({flexible[0]}) of the library's "
            "AdapterModel classes, which encoder bundles do not read; train it on the "
            "transformers task model, or save the adapter with with_head=False"
        )
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def with_library_head(adapter: SplitAdapter, model: nn.Module) -> SplitAdapter:
    """`adapter` with the task head the library saved beside it (none: the base's head)."""
    source = adapter.source
    heads = read_library_head(source.name, source.path)
    params = dict(model.named_parameters())
    for key, value in heads.items():
        if key not in params or value.shape[1:] != tuple(params[key].shape[1:]):
            raise ExportError(
                f"adapter {source.name}: head tensor {key} {list(value.shape)} does not fit "
                f"the {type(model).__name__}; pass the base and --task it was trained with"
            )
    return dataclasses.replace(adapter, heads=heads) if heads else adapter


def added_head(name: str, folder: Path, manifest: Manifest) -> tuple[dict[str, np.ndarray], int]:
    """`adapters add` on an encoder bundle: the library head's head-bank slot tensors (zero-
    padded; a leaf it lacks keeps the base's) and its label count (0: the base head's)."""
    info = manifest.encoder
    if info is None or not info.max_labels:
        return {}, 0
    banks = {t.name: tuple(t.shape[1:]) for t in manifest.graph.inputs if t.name in info.heads}
    head = read_library_head(name, folder)
    tensors = {}
    for key, value in head.items():
        bank = names.head_input(*key.rsplit(".", 1))
        shape = banks.get(bank)
        fits = shape is not None and len(shape) == value.ndim
        if not fits or any(n > m for n, m in zip(value.shape, shape, strict=True)):
            raise ExportError(
                f"adapter {name}: head tensor {key} {list(value.shape)} has no head bank that "
                "holds it in this bundle; re-export the bundle with this adapter"
            )
        padded = np.zeros(shape, dtype=np.float32)
        padded[tuple(slice(0, n) for n in value.shape)] = value
        tensors[bank] = padded
    label_head = get_encoder(manifest.base_model.architecture).label_head(info.task)
    weight = head.get(f"{label_head}.weight")
    return tensors, 0 if weight is None else int(weight.shape[0])
