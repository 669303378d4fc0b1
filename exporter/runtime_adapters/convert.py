"""PEFT adapter of a bank method -> one bank slot (the tensors of docs/bundle-format.md).

PEFT's own layers do the reading: the adapter is loaded into a *skeleton* that holds only
the bundle's target modules (real base weights where the method reads them: DoRA's norm,
rotations; zeros otherwise), so rank/alpha patterns, rsLoRA, AdaLoRA's rank normalisation,
shared bases (VeRA, VBLoRA, ...) and every delta follow PEFT exactly, without loading the
whole base model. Methods the registry (bundle/methods.py) marks BANKS_FACTORED have no
stored low-rank form: PEFT's own merge computes their dense delta W' - W, and an SVD at its
numerical rank gives A and B exactly. Everything is computed in float64 and cast to the
bundle's dtype once.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from peft_export.bundle import names
from peft_export.bundle.manifest import AdapterLayout, ModuleSlot
from peft_export.bundle.methods import BANKS_FACTORED, get_method
from peft_export.exporter.adapter_source import AdapterSource, missing_package
from peft_export.exporter.errors import ExportError
from peft_export.exporter.runtime_adapters import tokens

_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"
ALGEBRAIC_RANK_METHODS = ("loha", "lokr")
"""Factored methods whose rank has a known algebraic bound, which caps the SVD's rank."""
SVD_RELATIVE_TOL = 1e-9
"""Singular values below this fraction of the largest are float64 round-off, not rank."""
RANGE_START = 16
"""First width of `_svd_factors`' search for a low-rank delta's range."""


@dataclass
class SlotTensors:
    """One adapter in graph layout: per-module bank parts without the slot dimension."""

    name: str
    method: str
    rank: int
    source: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    vocab_size: int = 0
    """Vocabulary of an adapter that adds tokens (0: the base's)."""
    alora_invocation_tokens: list[int] = field(default_factory=list)


def adapter_modules(source: AdapterSource) -> list[str]:
    """Dotted module paths the adapter's tensors touch (as in the HF model)."""
    if source.config.get("lora_bias"):
        raise ExportError(
            f"adapter {source.name} trains a bias on lora_B (lora_bias), which the bank "
            "inputs cannot carry; export it with --mode merged"
        )
    fused = source.config.get("target_parameters")
    if fused:
        raise ExportError(
            f"adapter {source.name} puts LoRA on fused parameters ({', '.join(fused)}: PEFT "
            "target_parameters, e.g. MoE experts), which runtime banks of linear layers cannot "
            "carry; export it with --mode merged"
        )
    prefix = _tuner_prefix(source)
    paths: set[str] = set()
    token_side = tokens.token_tensor_keys(source)
    for key in source.header.tensors:
        if key in token_side:
            continue  # token banks (exporter/runtime_adapters/tokens.py)
        if not key.startswith(_PEFT_PREFIX):
            continue  # a basis shared by every layer (VeRA's vera_A, UniLoRA's theta)
        inner = key.removeprefix(_PEFT_PREFIX)
        if ".modules_to_save." in inner:
            module = inner.split(".modules_to_save")[0]
            raise ExportError(
                f"adapter {source.name} also trains whole modules ({module}); runtime mode "
                "serves only adapter deltas: export it with --mode merged"
            )
        parts = inner.split(".")
        tuner = next((i for i, part in enumerate(parts) if part.startswith(prefix)), None)
        if tuner is None:
            raise ExportError(
                f"adapter {source.name}: tensor {key} is not a {source.method} layer tensor; "
                "re-save the adapter with PEFT"
            )
        paths.add(".".join(parts[:tuner]))
    if not paths and not token_side:
        return _config_targets(source)  # every tensor shared (UniLoRA)
    return sorted(paths)


def _tuner_prefix(source: AdapterSource) -> str:
    """The attribute prefix PEFT's tuner gives its layer tensors (`lora_`, `vera_lambda_`)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(str(source.config.get("peft_type", "")).upper())
    prefix = getattr(tuner, "prefix", None)
    if not prefix:
        raise ExportError(f"adapter {source.name}: {source.method} has no bank layers")
    return prefix


def _config_targets(source: AdapterSource) -> list[str]:
    """Module names of an adapter that stores only shared tensors (UniLoRA): its config's
    target_modules, matched by name like --target-modules."""
    targets = source.config.get("target_modules")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        return sorted(targets)
    raise ExportError(
        f"adapter {source.name} stores no per-layer tensors and its target_modules is not a "
        "list of module names; export it with --mode merged"
    )


def check_fits_layout(
    source: AdapterSource, layout: AdapterLayout, inputs: Collection[str] | None = None
) -> list[ModuleSlot]:
    """The bundle modules the adapter needs; refuse a module the bundle lacks, or a DoRA
    adapter where `inputs` (the graph's input names) have no `out_scale` for it.

    The gate is on graph inputs, not on the method names the bundle was exported with
    (bundle/lora_methods.py); `check_inputs` checks the converted tensors exactly (which
    scales IA3 fills depends on its feed-forward modules). `inputs` None checks modules only.
    """
    if inputs is not None:
        tokens.check_slot_inputs(source, inputs)
    slots = []
    for path in adapter_modules(source):
        found = [layout.module(path)] if layout.module(path) is not None else []
        if not found and "." not in path:
            found = [m for m in layout.modules if m.path.endswith("." + path)]
        if not found:
            raise ExportError(
                f"adapter {source.name} targets {path}, which this bundle has no bank for; "
                "re-export with --target-modules covering it"
            )
        if source.method == "dora" and inputs is not None:
            _check_input(source, names.lora_input(path, "out_scale"), inputs)
        slots.extend(m for m in found if m not in slots)
    order = {m.path: i for i, m in enumerate(layout.modules)}
    return sorted(slots, key=lambda m: order[m.path])  # the model's order: PEFT's, too


def check_inputs(adapter: SlotTensors, source: AdapterSource, inputs: Collection[str]) -> None:
    """Refuse a converted adapter that fills a bank input the bundle's graph lacks."""
    for key in adapter.tensors:
        _check_input(source, key, inputs)


def _check_input(source: AdapterSource, key: str, inputs: Collection[str]) -> None:
    if key not in inputs:
        raise ExportError(
            f"adapter {source.name} is {source.method} and needs input {key}, which this "
            f"bundle's graph lacks; re-export with --methods including {source.method} (or "
            "without --methods)"
        )


def build_skeleton(
    modules: list[ModuleSlot],
    *,
    conv1d: bool,
    base_weights: Mapping[str, np.ndarray] | None = None,
) -> nn.Module:
    """A module tree holding only `modules` at their dotted paths, in float32: PEFT sets up
    some methods only in float32 (PSOFT); `convert_adapter` makes it float64 once loaded.

    `base_weights` maps `PATH.weight` ([out, in]) to the base weight; missing ones are zero,
    which is exact for every method except those whose delta reads W (DoRA's norm, OFT's
    rotation: `needs_base_weights` in bundle/methods.py).
    """
    from transformers.pytorch_utils import Conv1D

    root = nn.Module()
    for slot in modules:
        if conv1d:
            layer: nn.Module = Conv1D(slot.out_features, slot.in_features)
        else:
            layer = nn.Linear(slot.in_features, slot.out_features, bias=slot.has_bias)
        with torch.no_grad():
            weight = np.zeros((slot.out_features, slot.in_features))
            if base_weights is not None and f"{slot.path}.weight" in base_weights:
                weight = base_weights[f"{slot.path}.weight"]
            w = torch.as_tensor(np.asarray(weight, dtype=np.float32))
            layer.weight.copy_(w.T if conv1d else w)
            if getattr(layer, "bias", None) is not None:
                layer.bias.zero_()
        parent = root
        *parents, leaf = slot.path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    return root


def convert_adapter(
    source: AdapterSource,
    layout: AdapterLayout,
    *,
    conv1d: bool,
    base_weights: Mapping[str, np.ndarray] | None = None,
    pad: bool = True,
    inputs: Collection[str] | None = None,
) -> SlotTensors:
    """Convert a validated PEFT adapter to one bank slot of `layout` (rank <= r_max).

    `pad=False` leaves the rank unpadded and unchecked (to choose r_max from the adapters);
    `inputs`: the graph's input names, which must cover every tensor the adapter fills (None:
    not checked, for an export that chooses its inputs from the adapters).
    """
    import peft
    from peft.utils import set_peft_model_state_dict

    slots = check_fits_layout(source, layout, inputs)
    method = get_method(source.method)
    if method is not None and method.needs_base_weights and base_weights is None:
        raise ExportError(
            f"adapter {source.name} is {method.label}, whose delta depends on the base weights, "
            "but the bundle keeps no base weights of its target modules; re-export with "
            f"--methods including {source.method}"
        )
    skeleton = build_skeleton(slots, conv1d=conv1d, base_weights=base_weights)
    token_side = tokens.token_tensor_keys(source)
    state = {
        k: torch.as_tensor(v).double() if v.dtype.kind == "f" else torch.as_tensor(v)
        for k, v in source.load_tensors().items()
        if k not in token_side
    }
    try:
        config = peft.PeftConfig.from_peft_type(**_config_kwargs(source.config))
        config.inference_mode = True
        peft_model = peft.PeftModel(skeleton, config, adapter_name=_ADAPTER)
    except ImportError as exc:
        raise missing_package(source, exc) from None
    except RuntimeError as exc:
        raise _does_not_fit(source, exc) from None
    except (TypeError, AttributeError, KeyError, ValueError, re.error) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(
            f"adapter {source.name}: its adapter_config.json is not a valid {source.method} "
            f"config ({reason:.160}); re-save the adapter with PEFT"
        ) from None
    try:
        result = set_peft_model_state_dict(peft_model, state, adapter_name=_ADAPTER)
    except (RuntimeError, ValueError) as exc:
        raise _does_not_fit(source, exc) from None
    if result.unexpected_keys:
        raise ExportError(
            f"adapter {source.name} has tensors this converter does not place "
            f"({result.unexpected_keys[0]}); export it with --mode merged"
        )
    skeleton.double()
    out = SlotTensors(source.name, source.method, 0, str(source.path))
    out.alora_invocation_tokens = tokens.alora_tokens(source)
    with torch.no_grad():
        for slot in slots:
            layer = skeleton.get_submodule(slot.path)
            rank = _convert_layer(layer, slot, source, conv1d, out.tensors)
            out.rank = max(out.rank, rank)
    if inputs is not None:
        check_inputs(out, source, inputs)
    for key, value in out.tensors.items():
        if not np.isfinite(value).all():
            raise ExportError(
                f"adapter {source.name}: converting it gives NaN or Inf in {key} (check "
                "lora_alpha and the scales in adapter_config.json); re-save it with PEFT"
            )
    return pad_slot(out, layout.r_max) if pad else out


def _does_not_fit(source: AdapterSource, exc: Exception) -> ExportError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if "mismatch" in line), lines[0] if lines else "")
    reason = reason.replace(_PEFT_PREFIX, "")  # the skeleton is a PeftModel: its own prefix
    return ExportError(
        f"adapter {source.name} does not fit this bundle's base model ({reason:.300}); "
        "it was trained on another base model"
    )


def pad_slot(adapter: SlotTensors, r_max: int) -> SlotTensors:
    """Zero-pad A rows and B columns to r_max (exact); refuse a rank above it."""
    if adapter.rank > r_max:
        raise ExportError(
            f"adapter {adapter.name} has rank {adapter.rank} (as {adapter.method}) but the "
            f"bundle's banks hold rank {r_max}; re-export with --max-rank {adapter.rank} or more"
        )
    for key, value in list(adapter.tensors.items()):
        adapter.tensors[key] = _pad_rank(key, value, r_max)
    return adapter


def _config_kwargs(config: dict) -> dict:
    """The saved adapter config minus fields PEFT itself derives on load."""
    # Token-side fields are converted by exporter/runtime_adapters/tokens.py, not by PEFT here.
    dropped = ("auto_mapping", "revision", "trainable_token_indices", "modules_to_save")
    kwargs = {k: v for k, v in config.items() if k not in dropped}
    kwargs.setdefault("peft_type", config.get("peft_type"))
    return kwargs


def _convert_layer(
    layer: nn.Module,
    slot: ModuleSlot,
    source: AdapterSource,
    conv1d: bool,
    out: dict[str, np.ndarray],
) -> int:
    path, method = slot.path, source.method
    entry = get_method(method)
    if method == "ia3":
        scale = layer.ia3_l[_ADAPTER].reshape(-1).numpy()
        if layer.is_feedforward:
            out[names.lora_input(path, "in_scale")] = scale
        else:
            out[names.lora_input(path, "out_scale")] = scale
            if slot.has_bias:
                out[names.lora_input(path, "bias_scale")] = scale
        return 0
    if entry is not None and entry.runtime == BANKS_FACTORED:
        delta = _merged_delta(layer, conv1d, source)
        bound = (
            _algebraic_rank(layer, method) if method in ALGEBRAIC_RANK_METHODS else min(delta.shape)
        )
        a, b = _svd_factors(delta, bound)
    elif method == "adalora":
        scale = layer.scaling[_ADAPTER] / (layer.ranknum[_ADAPTER].item() + 1e-5)
        a = (layer.lora_A[_ADAPTER] * layer.lora_E[_ADAPTER]).numpy()
        b = layer.lora_B[_ADAPTER].numpy() * scale
    else:
        a = layer.lora_A[_ADAPTER].weight.numpy()
        b = layer.lora_B[_ADAPTER].weight.numpy() * layer.scaling[_ADAPTER]
    out[names.lora_input(path, "A")] = a
    out[names.lora_input(path, "B")] = b
    if method == "dora":
        weight = layer.get_base_layer().weight.numpy()
        weight = weight.T if conv1d else weight
        norm = np.linalg.norm(weight + b @ a, axis=1)
        magnitude = layer.lora_magnitude_vector[_ADAPTER].weight.numpy()
        out[names.lora_input(path, "out_scale")] = magnitude / norm
    return a.shape[0]


def _merged_delta(layer: nn.Module, conv1d: bool, source: AdapterSource) -> np.ndarray:
    """W' - W [out, in] as PEFT's own merge computes it (the skeleton layer is merged in
    place; it is not used again). A merge that changes the bias is refused: banks carry no
    bias."""
    base = layer.get_base_layer()
    weight = base.weight.detach().clone()
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().clone()
    layer.merge(adapter_names=[_ADAPTER])
    if bias is not None and not torch.equal(bias, base.bias):
        raise ExportError(
            f"adapter {source.name} ({source.method}) changes the bias of {type(base).__name__} "
            "layers, which bank inputs cannot carry; export it with --mode merged"
        )
    delta = (base.weight.detach() - weight).numpy()
    return delta.T if conv1d else delta


def _algebraic_rank(layer: nn.Module, method: str) -> int:
    """Upper bound of the delta's rank: r*r for LoHa, rank(w1)*rank(w2) for LoKr."""
    if method == "loha":
        return layer.r[_ADAPTER] ** 2
    factors = []
    for side in ("w1", "w2"):
        full = getattr(layer, f"lokr_{side}")
        if _ADAPTER in full:
            factors.append(min(full[_ADAPTER].shape))
        else:
            factors.append(getattr(layer, f"lokr_{side}_a")[_ADAPTER].shape[1])
    return factors[0] * factors[1]


def _svd_factors(delta: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """delta [out, in] = B @ A with rank <= bound (singular values folded into B).

    A delta of low rank in a large layer (VeRA's r in a 4096² projection) is factored without
    the full SVD, which costs minutes there: Q spans delta·Ω for a seeded Gaussian Ω of width
    k (doubling from RANGE_START); once ||delta - Q·Qᵀ·delta|| is float64 round-off, delta =
    Q·(Qᵀ·delta) and the SVD of that k-row factor gives delta's own singular values. A delta
    of half the layer's rank or more takes the full SVD.
    """
    rng = np.random.default_rng(0)
    tolerance = np.linalg.norm(delta) * SVD_RELATIVE_TOL
    width = RANGE_START
    while 2 * width <= min(delta.shape):
        q, _ = np.linalg.qr(delta @ rng.standard_normal((delta.shape[1], width)))
        projected = q.T @ delta
        if np.linalg.norm(delta - q @ projected) <= tolerance:
            u, s, vt = np.linalg.svd(projected, full_matrices=False)
            return _kept_factors(q @ u, s, vt, bound)
        width *= 2
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return _kept_factors(u, s, vt, bound)


def _kept_factors(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, bound: int
) -> tuple[np.ndarray, np.ndarray]:
    keep = int(np.sum(s > s[0] * SVD_RELATIVE_TOL)) if s.size and s[0] > 0 else 0
    keep = max(1, min(keep, bound))
    return vt[:keep], u[:, :keep] * s[:keep]


def _pad_rank(key: str, value: np.ndarray, r_max: int) -> np.ndarray:
    split = names.split_lora_input(key)
    part = split[1] if split else ""
    if part == "A":
        padded = np.zeros((r_max, value.shape[1]))
        padded[: value.shape[0]] = value
        return padded
    if part == "B":
        padded = np.zeros((value.shape[0], r_max))
        padded[:, : value.shape[1]] = value
        return padded
    return value
