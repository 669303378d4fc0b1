"""Runtime-mode LN tuning: plan the norm banks, convert adapters into them, `adapters add`.

An LN-tuning adapter is one slot like a LoRA adapter (same `slots` option, same adapter_ids),
so one batch mixes LN-tuning, LoRA and base rows. Its file holds, per tuned norm parameter,
the adapter's value minus the base's (bundle/norm_banks.py); the base values of every banked
norm stay in `adapters/_base_norms.safetensors`, so adding an adapter later reads the bundle
alone. Option (export flag): `norm_targets` (norm names or paths, comma-separated, or "all":
every norm layer of the base, so any LN-tuning adapter can be added later; default: the norms
the given adapters tune).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from torch import nn

from peft_export.bundle import names, safetensors_io
from peft_export.bundle import norm_banks as nb
from peft_export.bundle.atomic import staged_file, staged_update, write_text
from peft_export.bundle.errors import BundleError
from peft_export.bundle.manifest import AdapterLayout, InstalledAdapter, Manifest
from peft_export.bundle.paths import confined
from peft_export.exporter.adapter_source import AdapterSource, check_new_adapter_name, read_adapter
from peft_export.exporter.bundle_files import read_manifest
from peft_export.exporter.errors import ExportError
from peft_export.exporter.pipeline import ExportContext, RuntimePlan
from peft_export.exporter.runtime_adapters.bundle_adapters import install_all, install_converted
from peft_export.exporter.runtime_adapters.convert import SlotTensors
from peft_export.exporter.runtime_adapters.norm_banks import NormBanks, NormSlot
from peft_export.exporter.runtime_adapters.planner import DEFAULT_SLOTS, _listed

OPTION_KEYS = ("norm_targets",)
BASE_NORMS_FILE = names.adapter_file(nb.BASE_NORMS)
_PEFT_PREFIX = "base_model.model."
_LAYERS = ".ln_tuning_layers."
_MERGE_FIX = "export it with --mode merged"


def is_norm(module: nn.Module) -> bool:
    """A norm layer: a 1-D weight and a class named like one (LayerNorm, *RMSNorm, ...)."""
    weight = getattr(module, "weight", None)
    return (
        "norm" in type(module).__name__.lower()
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
    )


def norm_slot(path: str, module: nn.Module) -> NormSlot:
    parts = tuple(p for p in nb.PARTS if isinstance(getattr(module, p, None), nn.Parameter))
    return NormSlot(path, int(module.weight.shape[0]), parts)


def norm_slots(model: nn.Module, patterns: Sequence[str] | None) -> list[NormSlot]:
    """Norm layers whose path equals or ends with one of `patterns` (None: every one)."""
    found = [
        norm_slot(path, module)
        for path, module in model.named_modules()
        if is_norm(module) and (patterns is None or _matches(path, patterns))
    ]
    missing = [p for p in patterns or () if not any(_matches(s.path, [p]) for s in found)]
    if missing:
        raise ExportError(
            f"--norm-targets {', '.join(missing)} match no norm layer of the base model; name "
            "norm layers (e.g. input_layernorm, ln_1) or pass 'all'"
        )
    return found


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(path == p or path.endswith("." + p) for p in patterns)


def tuned_parameters(source: AdapterSource) -> dict[tuple[str, str], np.ndarray]:
    """(norm path, part) -> the adapter's value, from PEFT's saved keys
    (`base_model.model.PATH.ln_tuning_layers.PART`)."""
    out = {}
    for key, value in source.load_tensors().items():
        inner = key.removeprefix(_PEFT_PREFIX)
        path, found, part = inner.partition(_LAYERS)
        if not found or not path:
            raise ExportError(
                f"adapter {source.name}: tensor {key!r} is not an LN-tuning layer's parameter; "
                "re-save the adapter with PEFT"
            )
        out[(path, part)] = np.asarray(value, dtype=np.float32)
    return out


def check_norm_targets(source: AdapterSource, model: nn.Module) -> list[str]:
    """The norm paths the adapter tunes; refuses a tuned layer that is no norm."""
    paths = sorted({path for path, _ in tuned_parameters(source)})
    for path in paths:
        module = model.get_submodule(path)
        if not is_norm(module):
            raise ExportError(
                f"adapter {source.name} is LN tuning of {path} ({type(module).__name__}), which "
                f"is no norm layer, and the norm banks carry norm parameters only; {_MERGE_FIX}"
            )
    return paths


def convert_ln_tuning(
    source: AdapterSource, banks: Collection[str], base: Mapping[str, np.ndarray]
) -> SlotTensors:
    """The adapter's slot: per tuned parameter, its value minus the base's (`banks`: the
    graph's norm-bank inputs; `base`: the base's values by `PATH.PART`)."""
    slot = SlotTensors(source.name, nb.METHOD, 0, str(source.path))
    for (path, part), value in sorted(tuned_parameters(source).items()):
        name = nb.bank_input(path, part) if part in nb.PARTS else f"{path}.{part}"
        base_value = base.get(f"{path}.{part}")
        if name not in banks or base_value is None:
            raise ExportError(
                f"adapter {source.name} tunes {path}.{part}, which this bundle has no norm bank "
                "for; re-export with --norm-targets covering it (or --norm-targets all)"
            )
        if value.shape != base_value.shape:
            raise ExportError(
                f"adapter {source.name}: {path}.{part} is {list(value.shape)}, the base's is "
                f"{list(base_value.shape)}; it was trained on another base model"
            )
        slot.tensors[name] = value - base_value
    return slot


def base_norm_params(model: nn.Module, slots: Sequence[NormSlot]) -> dict[str, np.ndarray]:
    """`PATH.weight` / `PATH.bias` -> the base's value as fp32."""
    out = {}
    for slot in slots:
        module = model.get_submodule(slot.path)
        for part in slot.parts:
            value = getattr(module, part).detach().float().cpu().numpy()
            out[f"{slot.path}.{part}"] = np.ascontiguousarray(value)
    return out


def write_base_norms(bundle_dir: Path, params: Mapping[str, np.ndarray]) -> None:
    with staged_file(confined(bundle_dir, BASE_NORMS_FILE, lexical_only=True)) as tmp:
        save_file(dict(params), str(tmp), metadata={"format": "peft-export-base-norms"})


def read_base_norms(bundle_dir: Path) -> dict[str, np.ndarray]:
    path = confined(bundle_dir, BASE_NORMS_FILE)
    if not path.is_file():
        raise ExportError(f"{path} is missing; re-export the bundle with its LN-tuning adapters")
    try:
        return safetensors_io.read_tensors(path)
    except BundleError as exc:
        raise ExportError(f"{exc}; re-export the bundle") from None


def bank_inputs(manifest: Manifest) -> set[str]:
    """The graph's norm-bank inputs."""
    return {t.name for t in manifest.graph.inputs if nb.split_bank_input(t.name) is not None}


def plan_norm_banks(context: ExportContext) -> RuntimePlan | None:
    """Norm banks for the LN-tuning adapters given (or for the norms asked)."""
    sources = [s for s in context.sources if s.method == nb.METHOD]
    option = _listed(context.options.get("norm_targets"))
    if not sources and option is None:
        return None
    if context.options.get("ort_fusions", "none") != "none":
        raise ExportError(
            "LN-tuning norm banks are not combined with --ort-fusions yet (ONNX Runtime's fused "
            "norms take one weight for every row, not one per row); drop --ort-fusions"
        )
    tuned = sorted({p for s in sources for p in check_norm_targets(s, context.model)})
    patterns = tuned if option is None else None if option == ["all"] else option
    slots = norm_slots(context.model, patterns)
    if not slots:
        raise ExportError("the base model has no norm layers with a weight for norm banks")
    banks = NormBanks(
        slots, slots=int(context.options.get("slots") or DEFAULT_SLOTS), dtype=context.dtype
    )
    base = base_norm_params(context.model, slots)
    inputs = {nb.bank_input(s.path, p) for s in slots for p in s.parts}
    converted = [convert_ln_tuning(s, inputs, base) for s in sources]

    def write_adapters(stage: Path, manifest_layout: AdapterLayout) -> None:
        write_base_norms(stage, base)
        install_all(stage, manifest_layout, converted, context)

    return RuntimePlan(methods=(nb.METHOD,), extensions=[banks], write_adapters=write_adapters)


def add_ln_tuning_adapter(
    bundle_dir: str | Path, name: str, folder: str | Path, *, replace: bool = False
) -> InstalledAdapter:
    """Install a saved LN-tuning adapter into a runtime bundle that has norm banks."""
    root = Path(bundle_dir)
    with staged_update(root) as stage:
        manifest = read_manifest(root)
        inputs = bank_inputs(manifest)
        if manifest.mode != "runtime" or not inputs:
            raise ExportError(
                f"{root} has no norm banks for LN-tuning adapters; re-export it in runtime mode "
                "with an LN-tuning adapter or with --norm-targets all"
            )
        check_new_adapter_name(name, manifest.adapters.installed, replace=replace)
        source = read_adapter(folder, name=name)
        if source.method != nb.METHOD:
            raise ExportError(f"adapter {name} is {source.method}, not LN tuning")
        converted = convert_ln_tuning(source, inputs, read_base_norms(root))
        install_converted(
            stage,
            manifest.adapters,
            converted,
            weights_sha256=manifest.base_model.weights_sha256,
            precision=manifest.precision,
        )
        write_text(stage / names.MANIFEST, manifest.to_json())
    return manifest.adapters.installed[name]
