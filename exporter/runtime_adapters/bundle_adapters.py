"""Runtime-mode LoRA-family adapters in a bundle: plan the banks, write, add, list, remove.

`adapters add` converts a PEFT folder against the manifest alone (plus the DoRA side file),
so it takes seconds and never re-exports. Every check runs before the first write, and each
write is staged then renamed, so a refused adapter leaves the bundle untouched.

DoRA needs ||W + s·B·A|| per output row, and multiplicative methods (OFT, HRA, ...) a delta
W' - W, which depend on the base weights, so the bundle keeps the base weights of its target
modules in `adapters/_base_targets.safetensors` ([out, in], fp32) whenever such a method is
among the accepted methods (the default; bundle/methods.py says which); other methods need no
base weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import save_file

from peft_export.bundle import names, norm_banks, safetensors_io, token_inputs
from peft_export.bundle.atomic import staged_file, staged_update, write_text
from peft_export.bundle.errors import BundleError
from peft_export.bundle.lora_methods import (
    LORA_METHODS,
    accepted_methods,
    bank_parts,
    needs_base_weights,
)
from peft_export.bundle.manifest import AdapterLayout, InstalledAdapter, Manifest, ModuleSlot
from peft_export.bundle.paths import confined
from peft_export.exporter.adapter_source import (
    AdapterSource,
    cast_finite,
    check_new_adapter_name,
    read_adapter,
    uninstall,
)
from peft_export.exporter.bundle_files import file_sha256, read_manifest
from peft_export.exporter.errors import ExportError
from peft_export.exporter.runtime_adapters import tokens
from peft_export.exporter.runtime_adapters.convert import (
    SlotTensors,
    adapter_modules,
    check_fits_layout,
    convert_adapter,
    pad_slot,
)
from peft_export.models.architectures import get_arch

if TYPE_CHECKING:
    from peft_export.exporter.pipeline import ExportContext

BASE_TARGETS_FILE = names.adapter_file(names.BASE_TARGETS)
ORT_ADAPTER_SUFFIX = ".onnx_adapter"
SLOT_METHODS = LORA_METHODS + token_inputs.TOKEN_METHODS
"""Methods whose adapters fill bank slots (LoRA banks, token banks)."""
_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}


BankParts = dict[str, tuple[str, ...]]
"""Module path -> its bank inputs' parts (A, B, out_scale, ...), in `names.LORA_PARTS` order."""


def linear_modules(model: object, patterns: Iterable[str] | None = None) -> list[ModuleSlot]:
    """Linear layers of an HF model whose path equals or ends with one of `patterns`."""
    from peft_export.exporter.adapter_source import module_features

    spec = get_arch(model.config.model_type)
    wanted = list(patterns) if patterns is not None else list(spec.target_modules)
    found = []
    for path, module in model.named_modules():
        if not _matches(path, wanted):
            continue
        try:
            in_f, out_f = module_features(module)
        except ExportError:
            continue
        found.append(ModuleSlot(path, in_f, out_f, getattr(module, "bias", None) is not None))
    missing = [p for p in wanted if not any(_matches(m.path, [p]) for m in found)]
    if missing:
        raise ExportError(
            f"--target-modules {', '.join(missing)} match no linear layer of the base model; "
            f"use names like {', '.join(spec.target_modules)}"
        )
    return found


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(path == p or path.endswith("." + p) for p in patterns)


def plan_layout(
    model: object,
    sources: Sequence[AdapterSource],
    *,
    target_modules: Sequence[str] | None = None,
    max_rank: int | None = None,
    slots: int = 8,
    methods: Sequence[str] | None = None,
) -> tuple[AdapterLayout, BankParts, list[SlotTensors]]:
    """The bank layout for these adapters and options, each module's bank inputs, and the
    adapters converted into it.

    Defaults: the union of the adapters' modules, the largest adapter rank, and the whole
    LoRA family, so that `adapters add` takes any of its methods without a re-export (the
    manifest records every method the graph serves: bundle/lora_methods.py). `--methods`
    names exactly the inputs the graph gets, and the adapters given must fit them.
    """
    lora_sources = [s for s in sources if s.method in LORA_METHODS]
    if methods is not None:
        unknown = sorted(set(methods) - set(LORA_METHODS))
        if unknown:
            raise ExportError(
                f"--methods {','.join(unknown)} are not LoRA-family methods; "
                f"choose from {', '.join(LORA_METHODS)}"
            )
        if not methods:
            raise ExportError("runtime LoRA banks need --methods (e.g. lora,dora,ia3)")
    if target_modules is None:
        touched = sorted({p for s in lora_sources for p in adapter_modules(s)})
        if not touched:
            raise ExportError("no adapter names target modules; pass --target-modules")
        modules = linear_modules(model, touched)
    else:
        modules = linear_modules(model, target_modules)
    accepted = accepted_methods(LORA_METHODS if methods is None else methods)
    layout = AdapterLayout(methods=accepted, slots=slots, r_max=max_rank or 0)
    layout.modules = modules
    spec = get_arch(model.config.model_type)
    weights = base_target_weights(model, modules) if needs_base_weights(accepted) else None

    def convert(inputs: set[str] | None) -> list[SlotTensors]:
        options = {"conv1d": spec.conv1d_weights, "base_weights": weights, "pad": False}
        return [convert_adapter(s, layout, inputs=inputs, **options) for s in lora_sources]

    if methods is None:
        converted = convert(None)
        parts = _default_parts(modules, spec.feedforward_modules, converted)
    else:
        parts = {m.path: bank_parts(methods, m.has_bias) for m in modules}
        converted = convert(bank_input_names(parts))
    if max_rank is None:
        layout.r_max = max([c.rank for c in converted] + [1])
    return layout, parts, [pad_slot(c, layout.r_max) for c in converted]


def _default_parts(
    modules: Sequence[ModuleSlot], feedforward: Sequence[str], converted: Sequence[SlotTensors]
) -> BankParts:
    """The whole family's inputs, with IA3's `in_scale` only where IA3 scales inputs by
    default (the architecture's feed-forward modules, as PEFT's IA3 config does) or where a
    given adapter does: on every module it would cost a decode-time op per module and keep
    ONNX Runtime's fusions from packing q/k/v and gate/up (no two modules would share an
    input). An IA3 adapter scaling other inputs needs `--methods` naming ia3."""
    filled = {key for adapter in converted for key in adapter.tensors}
    return {
        m.path: bank_parts(
            LORA_METHODS,
            m.has_bias,
            in_scale=_matches(m.path, feedforward)
            or names.lora_input(m.path, "in_scale") in filled,
        )
        for m in modules
    }


def bank_input_names(parts: BankParts) -> set[str]:
    return {names.lora_input(path, part) for path, module in parts.items() for part in module}


def base_target_weights(model: object, modules: Sequence[ModuleSlot]) -> dict[str, np.ndarray]:
    """`PATH.weight` -> base weight [out, in] as fp32 (Conv1D weights transposed)."""
    conv1d = get_arch(model.config.model_type).conv1d_weights
    out = {}
    for slot in modules:
        weight = model.get_submodule(slot.path).weight.detach().float().cpu().numpy()
        out[f"{slot.path}.weight"] = np.ascontiguousarray(weight.T if conv1d else weight)
    return out


def write_base_targets(bundle_dir: Path, weights: Mapping[str, np.ndarray]) -> None:
    with staged_file(confined(bundle_dir, BASE_TARGETS_FILE, lexical_only=True)) as tmp:
        save_file(dict(weights), str(tmp), metadata={"format": "peft-export-base-targets"})


def read_base_targets(bundle_dir: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The target modules' base weights [out, in] fp32, as the graph computes with them.

    Quantized layers are read from the graph itself (their dequantized blocks); the side file
    holds the rest, and is absent when every target layer is quantized.
    """
    from peft_export.exporter.quantize.reference import graph_blocks

    layout = manifest.adapters
    tensors = {
        f"{path}.weight": block.dequantize()
        for path, block in graph_blocks(bundle_dir, manifest).items()
        if layout.module(path) is not None
    }
    path = confined(bundle_dir, BASE_TARGETS_FILE)
    if len(tensors) < len(layout.modules) and not path.is_file():
        raise ExportError(
            f"{path} is missing, so adapters whose delta reads the base weights (DoRA, OFT, "
            "...) cannot be converted for this bundle; re-export it without --methods"
        )
    if path.is_file():
        try:
            tensors.update(safetensors_io.read_tensors(path))
        except BundleError as exc:
            raise ExportError(f"{exc}; re-export the bundle") from None
    for slot in layout.modules:
        got = tensors.get(f"{slot.path}.weight")
        if got is None or got.shape != (slot.out_features, slot.in_features):
            raise ExportError(f"{path} lacks {slot.path}.weight; re-export the bundle")
    return tensors


def write_slot(
    adapter: SlotTensors,
    path: Path,
    *,
    weights_sha256: str,
    precision: str,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write `adapters/NAME.safetensors` atomically; returns its sha256. `metadata` adds
    entries to the file's header (encoder adapters: their labels)."""
    dtype = _DTYPES[precision]
    ints = {k: v for k, v in adapter.tensors.items() if k in token_inputs.INT_BANKS}
    floats = {k: v for k, v in adapter.tensors.items() if k not in ints}
    tensors = cast_finite(
        adapter.name,
        floats,
        precision,
        dtype,
        why="check lora_alpha and the scales in adapter_config.json",
        fix="re-save it with PEFT",
    )
    tensors.update({k: np.ascontiguousarray(v, dtype=np.int64) for k, v in ints.items()})
    metadata = {
        "format": names.ADAPTER_FILE_FORMAT,
        "version": names.ADAPTER_FILE_VERSION,
        "method": adapter.method,
        "name": adapter.name,
        "base_weights_sha256": weights_sha256,
        "rank": str(adapter.rank),
        "source": adapter.source,
        **(metadata or {}),
    }
    with staged_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        digest = file_sha256(tmp)
    return digest


def install_all(
    stage: Path, layout: AdapterLayout, adapters: Iterable[SlotTensors], context: ExportContext
) -> None:
    """A planner's export-time step: install every converted adapter into the staged bundle
    (the context gives the base's digest and the bundle's precision)."""
    for adapter in adapters:
        install_converted(
            stage,
            layout,
            adapter,
            weights_sha256=context.base_weights_sha256,
            precision=context.precision,
        )


def install_converted(
    bundle_dir: Path,
    layout: AdapterLayout,
    adapter: SlotTensors,
    *,
    weights_sha256: str,
    precision: str,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write one converted adapter into a (staged or live) bundle folder and record it."""
    relative = names.adapter_file(adapter.name)
    digest = write_slot(
        adapter,
        confined(bundle_dir, relative, lexical_only=True),
        metadata=metadata,
        weights_sha256=weights_sha256,
        precision=precision,
    )
    layout.installed[adapter.name] = InstalledAdapter(
        file=relative,
        method=adapter.method,
        rank=adapter.rank,
        sha256=digest,
        vocab_size=adapter.vocab_size,
        alora_invocation_tokens=list(adapter.alora_invocation_tokens),
    )


def add_adapter(
    bundle_dir: str | Path,
    name: str,
    peft_dir: str | Path,
    *,
    replace: bool = False,
    onnx_adapter: bool = False,
) -> InstalledAdapter:
    """Convert a PEFT folder into a runtime bundle's banks layout, without re-export.

    The bundle changes as one step (peft_export.bundle.atomic.staged_update): a refused or
    killed add leaves it as it was.
    """
    root = Path(bundle_dir)
    if load_runtime_manifest(root).encoder is not None:
        raise ExportError(
            f"{root} is an encoder bundle, whose adapters carry head banks and labels that "
            "'adapters add' does not write yet; re-export it with every --adapter"
        )
    with staged_update(root) as stage:
        manifest = load_runtime_manifest(root)
        check_new_adapter_name(name, manifest.adapters.installed, replace=replace)
        source = read_adapter(peft_dir, name=name)
        if source.method not in SLOT_METHODS:
            raise ExportError(
                f"adapter {name} is {source.method}; 'adapters add' installs LoRA-family "
                f"adapters ({', '.join(SLOT_METHODS)}); prompt-side adapters need their own "
                "export"
            )
        layout = manifest.adapters
        inputs = {t.name for t in manifest.graph.inputs}
        check_fits_layout(source, layout, inputs)  # before DoRA reads the base weights
        if source.method in token_inputs.TOKEN_METHODS:
            converted = SlotTensors(name, source.method, 0, str(source.path))
        else:
            weights = (
                read_base_targets(root, manifest) if needs_base_weights([source.method]) else None
            )
            conv1d = get_arch(manifest.base_model.architecture).conv1d_weights
            converted = convert_adapter(
                source, layout, conv1d=conv1d, base_weights=weights, inputs=inputs
            )
        if layout.tokens is not None and (
            source.method in token_inputs.TOKEN_METHODS or tokens.has_token_parts(source)
        ):
            base = tokens.TokenBase.read(root, layout.tokens)
            tokens.fill_slot(converted, source, base, layout.tokens)
        install_converted(
            stage,
            layout,
            converted,
            weights_sha256=manifest.base_model.weights_sha256,
            precision=manifest.precision,
        )
        if source.method not in layout.methods:
            # It fits the graph's inputs (checked above), so the graph serves it: a bundle
            # written before the method was known lists it now (the C++ runtime reads the list).
            layout.methods.append(source.method)
        write_text(stage / names.MANIFEST, manifest.to_json())
        if onnx_adapter:
            write_ort_adapter(stage, manifest, name)
    return manifest.adapters.installed[name]


def remove_adapter(bundle_dir: str | Path, name: str) -> None:
    """Remove an installed adapter; the bundle changes as one step, like `add_adapter`."""
    root = Path(bundle_dir)
    load_runtime_manifest(root, banks=False)
    with staged_update(root) as stage:
        uninstall(stage, load_runtime_manifest(root, banks=False), name)
        confined(stage, f"{names.ADAPTERS_DIR}/{name}{ORT_ADAPTER_SUFFIX}").unlink(missing_ok=True)


def load_runtime_manifest(root: Path, *, banks: bool = True) -> Manifest:
    """The manifest of a runtime bundle; `banks`: it must have LoRA banks too."""
    manifest = read_manifest(root)
    if manifest.mode != "runtime" or (banks and not manifest.adapters.modules):
        raise ExportError(
            f"{root} has no runtime LoRA banks (mode {manifest.mode}); export it with "
            "--mode runtime to add adapters without re-export"
        )
    return manifest


def full_slot(manifest: Manifest, tensors: Mapping[str, np.ndarray], dtype: np.dtype):
    """Every bank input of the graph for one slot: the adapter's tensors, slot-0 values
    elsewhere."""
    from peft_export.exporter.runtime_adapters.banks import bank_shape, slot_zero_value

    layout = manifest.adapters
    out = {}
    for tensor in manifest.graph.inputs:
        split = names.split_lora_input(tensor.name)
        if split is None:
            continue
        value = tensors.get(tensor.name)
        if value is None:
            shape = bank_shape(layout.module(split[0]), split[1], layout.r_max)
            value = np.full(shape, slot_zero_value(split[1]))
        out[tensor.name] = np.asarray(value, dtype=dtype)
    return out


def write_ort_adapter(root: Path, manifest: Manifest, name: str) -> Path:
    """ONNX Runtime's own adapter file for single-adapter use (RunOptions.add_active_adapter).

    It holds every bank input with two slots, [base, adapter]: feed `adapter_ids` = 1 for
    rows that use the adapter (0 for base rows).
    """
    import onnxruntime as ort

    extra = [
        t.name
        for t in manifest.graph.inputs
        if token_inputs.is_token_bank(t.name)
        or t.name == token_inputs.ALORA_START
        or norm_banks.split_bank_input(t.name) is not None
    ]
    if extra:
        raise ExportError(
            f"--onnx-adapter holds LoRA banks only, but this graph also takes {extra[0]}; "
            "drop --onnx-adapter and serve the bundle with peft_export.runtime"
        )
    entry = manifest.adapters.installed[name]
    tensors = safetensors_io.read_tensors(confined(root, entry.file))
    dtype = np.dtype(_DTYPES[manifest.precision])
    base = full_slot(manifest, {}, dtype)
    adapter = full_slot(manifest, tensors, dtype)
    params = {
        key: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.stack([base[key], value])))
        for key, value in adapter.items()
    }
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    path = confined(root, f"{names.ADAPTERS_DIR}/{name}{ORT_ADAPTER_SUFFIX}", lexical_only=True)
    with staged_file(path) as tmp:
        fmt.export_adapter(str(tmp))
    return path
