"""PEFT adapter folder -> a converted peft-export adapter file, in numpy (no torch, no peft).

What a server needs to take a new adapter over HTTP on a box without PyTorch: LoRA, rsLoRA,
DoRA and IA3 (bank slots: docs/bundle-format.md), prefix tuning and prompt tuning / P-tuning
(prompt-side inputs). The arithmetic is PEFT's (scale alpha/r, or alpha/sqrt(r) for rsLoRA,
per-module rank and alpha patterns; DoRA's magnitude over ||W + s·B·A|| per output row; IA3's
vector on the output, or on the input of feed-forward modules), computed in float64 and cast to
the bundle's dtype once; tests/test_serve_adapters.py checks the files equal those of
`peft-export adapters add` (which runs PEFT itself). AdaLoRA, LoHa, LoKr and LLaMA-Adapter
need PEFT's layers: those are refused with the command that converts them. The file is then
installed by the scheduler's registry, which checks it against the bundle.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from peft_export.bundle import names, safetensors_io
from peft_export.bundle.atomic import staged_file
from peft_export.bundle.errors import BundleError
from peft_export.bundle.json_limits import load_json
from peft_export.bundle.manifest import Manifest
from peft_export.bundle.paths import confined
from peft_export.runtime.errors import InferenceError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
_PREFIX = "base_model.model."
_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix_tuning"}
_TYPES |= {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "CPT": "cpt"}
_TYPES |= {"CARTRIDGE": "prefix_tuning"}  # PEFT serves its stored KV exactly as a prefix
_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}
BASE_TARGETS_FILE = names.adapter_file(names.BASE_TARGETS)


def convert_folder(root: Path, manifest: Manifest, name: str, folder: Path, out: Path) -> str:
    """Convert the PEFT adapter in `folder` for the bundle at `root`; write `out`, return the
    method. Every refusal is an InferenceError naming the problem and the fix."""
    config = _config(folder)
    method = _method(folder, config)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise InferenceError(
            f"{folder}: no {WEIGHTS_FILE}; re-save the adapter with PEFT save_pretrained"
        )
    try:
        tensors = safetensors_io.read_tensors(weights)
    except BundleError as exc:
        raise InferenceError(f"adapter {name}: {exc}") from None
    if any(info.dtype not in ("F32", "F16", "F64") for info in _header(weights).tensors.values()):
        raise InferenceError(
            f"adapter {name}: only F32/F16/F64 tensors convert without torch; "
            "use 'peft-export adapters add' for it"
        )
    tensors = {k.removeprefix(_PREFIX): v.astype(np.float64) for k, v in tensors.items()}
    rank = 0
    length = 0
    if method in ("lora", "rslora", "dora"):
        out_tensors, rank = _lora(root, manifest, name, method, config, tensors)
    elif method == "ia3":
        out_tensors = _ia3(manifest, name, config, tensors)
    elif method == "prefix_tuning":
        out_tensors, length = _prefix(manifest, name, config, tensors)
    else:
        out_tensors, length = _prompt_embeds(manifest, name, tensors)
    _write(out, manifest, name, method, folder, out_tensors, rank, length)
    return method


def _config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InferenceError(f"{folder}: no {CONFIG_FILE}; pass the folder PEFT's save wrote")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InferenceError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; re-save it")
    config = load_json(path.read_bytes(), where=str(path), fix="re-save it with PEFT")
    if not isinstance(config, dict):
        raise InferenceError(f"{path} is not a JSON object; re-save it with PEFT")
    return config


def _method(folder: Path, config: dict[str, Any]) -> str:
    peft_type = str(config.get("peft_type", "")).upper()
    method = _TYPES.get(peft_type)
    if method is None:
        raise InferenceError(
            f"{folder}: PEFT type {config.get('peft_type')!r} does not convert without torch "
            "(LoRA, rsLoRA, DoRA, IA3, prefix / prompt tuning, P-tuning, CPT and Cartridge "
            "do); install it with 'peft-export adapters add BUNDLE NAME=DIR' on a machine with "
            "the export extra"
        )
    if method == "lora" and config.get("use_dora"):
        return "dora"
    if method == "lora" and config.get("use_rslora"):
        return "rslora"
    return method


def _header(path: Path) -> safetensors_io.SafetensorsHeader:
    return safetensors_io.read_header(path)


def _pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path that equals it
    or ends with '.' + it (keys are regular expressions)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", path):
            return value
    return default


def _module_tensors(tensors: dict[str, np.ndarray], suffix: str) -> dict[str, np.ndarray]:
    """module path -> tensor, for keys ending in `suffix` (e.g. '.lora_A.weight')."""
    return {k.removesuffix(suffix): v for k, v in tensors.items() if k.endswith(suffix)}


def _slot(manifest: Manifest, name: str, path: str):
    slot = manifest.adapters.module(path)
    if slot is None:
        raise InferenceError(
            f"adapter {name} targets {path}, which this bundle has no bank for; re-export the "
            "bundle with --target-modules covering it"
        )
    return slot


def _lora(root, manifest, name, method, config, tensors) -> tuple[dict[str, np.ndarray], int]:
    if config.get("lora_bias"):
        raise InferenceError(f"adapter {name} trains a bias on lora_B; export it merged")
    a_of = _module_tensors(tensors, ".lora_A.weight")
    b_of = _module_tensors(tensors, ".lora_B.weight")
    magnitude = _module_tensors(tensors, ".lora_magnitude_vector")
    known = {*(f"{p}.lora_A.weight" for p in a_of), *(f"{p}.lora_B.weight" for p in b_of)}
    known |= {f"{p}.lora_magnitude_vector" for p in magnitude}
    extra = sorted(set(tensors) - known)
    if extra or set(a_of) != set(b_of) or not a_of:
        raise InferenceError(
            f"adapter {name} has tensors a LoRA converter does not place "
            f"({(extra or ['no lora_A/lora_B pairs'])[0]}); export it with --mode merged"
        )
    layout = manifest.adapters
    weights = _base_targets(root, manifest, name) if method == "dora" else {}
    out: dict[str, np.ndarray] = {}
    rank = 0
    for path in sorted(a_of):
        slot = _slot(manifest, name, path)
        a, b = a_of[path], b_of[path]
        r = a.shape[0]
        if a.shape != (r, slot.in_features) or b.shape != (slot.out_features, r):
            raise InferenceError(
                f"adapter {name} does not fit this bundle's base model ({path}: A "
                f"{list(a.shape)}, B {list(b.shape)}); it was trained on another base model"
            )
        if r > layout.r_max:
            raise InferenceError(
                f"adapter {name} has rank {r} but the bundle's banks hold rank {layout.r_max}; "
                f"re-export with --max-rank {r} or more"
            )
        alpha = float(_pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha")))
        r_cfg = int(_pattern_value(config.get("rank_pattern"), path, config.get("r", r)))
        scale = alpha / (np.sqrt(r_cfg) if config.get("use_rslora") else r_cfg)
        b = b * scale
        out[names.lora_input(path, "A")] = _pad(a, layout.r_max, axis=0)
        out[names.lora_input(path, "B")] = _pad(b, layout.r_max, axis=1)
        if method == "dora":
            if path not in magnitude:
                raise InferenceError(f"adapter {name} is DoRA but lacks {path}'s magnitude")
            norm = np.linalg.norm(weights[f"{path}.weight"] + b @ a, axis=1)
            out[names.lora_input(path, "out_scale")] = magnitude[path].reshape(-1) / norm
        rank = max(rank, r)
    _check_inputs(manifest, name, method, out)
    return out, rank


def _ia3(manifest, name, config, tensors) -> dict[str, np.ndarray]:
    vectors = _module_tensors(tensors, ".ia3_l")
    if not vectors or len(vectors) != len(tensors):
        raise InferenceError(f"adapter {name} is IA3 but holds other tensors; re-save it")
    feedforward = config.get("feedforward_modules") or []
    out: dict[str, np.ndarray] = {}
    for path, vector in sorted(vectors.items()):
        slot = _slot(manifest, name, path)
        if isinstance(feedforward, str):
            is_ff = re.fullmatch(feedforward, path) is not None
        else:
            is_ff = any(path == k or path.endswith("." + k) for k in feedforward)
        width = slot.in_features if is_ff else slot.out_features
        if vector.size != width:
            raise InferenceError(
                f"adapter {name} does not fit this bundle's base model ({path}: IA3 vector of "
                f"{vector.size}, expected {width}); it was trained on another base model"
            )
        if is_ff:
            out[names.lora_input(path, "in_scale")] = vector.reshape(-1)
        else:
            out[names.lora_input(path, "out_scale")] = vector.reshape(-1)
            if slot.has_bias:
                out[names.lora_input(path, "bias_scale")] = vector.reshape(-1)
    _check_inputs(manifest, name, "ia3", out)
    return out


def _check_inputs(manifest: Manifest, name: str, method: str, out: dict) -> None:
    inputs = {t.name for t in manifest.graph.inputs}
    for key in out:
        if key not in inputs:
            raise InferenceError(
                f"adapter {name} is {method} and needs input {key}, which this bundle's graph "
                f"lacks; re-export with --methods including {method} (or without --methods)"
            )


def _base_targets(root: Path, manifest: Manifest, name: str) -> dict[str, np.ndarray]:
    """Target modules' base weights [out, in] for DoRA, from the bundle's side file."""
    path = confined(root, BASE_TARGETS_FILE)
    if not path.is_file():
        raise InferenceError(
            f"adapter {name} is DoRA but {path} is missing (a quantized or non-DoRA bundle); "
            "install it with 'peft-export adapters add'"
        )
    try:
        weights = safetensors_io.read_tensors(path)
    except BundleError as exc:
        raise InferenceError(f"{exc}; re-export the bundle") from None
    return {k: v.astype(np.float64) for k, v in weights.items()}


def _pad(value: np.ndarray, r_max: int, axis: int) -> np.ndarray:
    widths = [(0, 0), (0, 0)]
    widths[axis] = (0, r_max - value.shape[axis])
    return np.pad(value, widths)


def _prefix(manifest, name, config, tensors) -> tuple[dict[str, np.ndarray], int]:
    embeddings = _embeddings(name, tensors)
    kv = manifest.kv
    layers, heads = int(config.get("num_layers") or 0), int(config.get("num_attention_heads") or 0)
    token_dim = int(config.get("token_dim") or 0)
    want = (kv.num_layers, kv.num_kv_heads, kv.num_kv_heads * kv.head_dim)
    n = embeddings.shape[0]
    if (layers, heads, token_dim) != want or embeddings.shape != (n, 2 * layers * token_dim):
        raise InferenceError(
            f"prefix adapter {name} was made for another base ({layers} layers x {heads} heads "
            f"x {token_dim}; this base: {want[0]} x {want[1]} x {want[2]})"
        )
    # PEFT views each virtual token's vector as [2 * layers, heads, head_dim], keys first.
    split = embeddings.reshape(n, 2 * layers, heads, kv.head_dim).transpose(1, 2, 0, 3)
    out = {}
    for layer in range(layers):
        out[names.prefix_key(layer)] = np.ascontiguousarray(split[2 * layer])
        out[names.prefix_value(layer)] = np.ascontiguousarray(split[2 * layer + 1])
    return out, n


def _prompt_embeds(manifest, name, tensors) -> tuple[dict[str, np.ndarray], int]:
    embeddings = _embeddings(name, tensors)
    if embeddings.ndim != 2 or embeddings.shape[1] != manifest.hidden_size:
        raise InferenceError(
            f"adapter {name} has prompt embeddings of width {embeddings.shape[-1]}, the base's "
            f"hidden size is {manifest.hidden_size}; it was trained for another base model"
        )
    return {names.PROMPT_EMBEDS: embeddings}, embeddings.shape[0]


def _embeddings(name: str, tensors: dict[str, np.ndarray]) -> np.ndarray:
    value = tensors.get("prompt_embeddings")
    if value is None:
        raise InferenceError(
            f"adapter {name} has no 'prompt_embeddings'; save it with PEFT save_pretrained"
        )
    return value


def _write(out, manifest, name, method, folder, tensors, rank, length) -> None:
    dtype = _DTYPES.get(manifest.precision, np.float32)
    with np.errstate(over="ignore"):
        cast = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()}
    for key, value in cast.items():
        if not np.isfinite(value).all():
            raise InferenceError(
                f"adapter {name}: {key} is NaN or overflows {manifest.precision}; check "
                "lora_alpha and the scales in adapter_config.json"
            )
    metadata = {
        "format": names.ADAPTER_FILE_FORMAT,
        "version": names.ADAPTER_FILE_VERSION,
        "method": method,
        "name": name,
        "base_weights_sha256": manifest.base_model.weights_sha256,
        "rank": str(rank),
        "source": str(folder),
    }
    if length:
        metadata["length"] = str(length)
    with staged_file(out) as tmp:
        save_file(cast, str(tmp), metadata=metadata)
