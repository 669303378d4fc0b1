"""Read and validate a PEFT adapter folder before anything is built from it.

Everything a user can get wrong (wrong folder, pickled weights, corrupt files, an adapter
trained on another base, NaN weights, a method other than the one asked for) is refused
here with one line naming the problem and the fix, so the slow steps never start on bad input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bundle import methods, names, safetensors_io
from peft_export.bundle.errors import BundleError
from peft_export.bundle.json_limits import load_json
from peft_export.exporter.errors import ExportError
from peft_export.models.architectures import get_arch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 16 * 1024 * 1024
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
INDEX_DTYPES = ("I64", "I32")

METHODS = methods.served_names()
"""Methods some export mode serves (bundle/methods.py)."""
PROMPT_SIDE = methods.runtime_names(methods.PREFIX_KV, methods.PROMPT_EMBEDS, methods.ADAPTION_KV)
_PROMPT_EMBEDS = methods.runtime_names(methods.PROMPT_EMBEDS)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_PEFT_PREFIX = "base_model.model."
_SHARED_PREFIX = "base_model."
_SHAPED_PARTS = (
    "lora_A",
    "lora_B",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "lora_magnitude_vector",
    "ia3_l",
)
"""Parts whose shape `_expected_shape` knows; other methods' shapes are checked by PEFT."""
_RESAVE = "re-save it with PEFT"


@dataclass
class AdapterSource:
    """A validated adapter folder: what it is and where its tensors are."""

    name: str
    path: Path
    method: str
    config: dict[str, Any]
    header: safetensors_io.SafetensorsHeader
    weights_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.weights_file = self.path / WEIGHTS_FILE

    @property
    def prompt_side(self) -> bool:
        return self.method in PROMPT_SIDE

    def load_tensors(self) -> dict[str, np.ndarray]:
        """The adapter's tensors as numpy (BF16 widened to float32), checked finite."""
        return _read_checked(self.weights_file, self.header)


def missing_package(source: AdapterSource, exc: ImportError) -> ExportError:
    """PEFT imports some methods' extra packages when it loads them (AdaMSS: scikit-learn)."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ExportError(
        f"adapter {source.name}: PEFT needs a package to load {source.method} ({reason:.160}); "
        "install it (pip install 'peft-export[adamss]' installs AdaMSS's)"
    )


def parse_adapter_arg(value: str) -> tuple[str | None, str]:
    """`NAME=DIR` or `DIR` (name then defaults to the folder name)."""
    name, sep, path = value.partition("=")
    if not sep or Path(value).exists():
        return None, value
    if not name or not path:
        raise ExportError(
            f"--adapter {value!r}: write NAME=DIR with both parts, or just DIR "
            "(e.g. --adapter fr=./lora-fr)"
        )
    return name, path


def check_name(name: str) -> str:
    """The one check of an adapter name, for `export`, `adapters add` and `verify --source`:
    a file name, and none of the bundle's own (its file would replace the bundle's)."""
    if not _NAME.fullmatch(name):
        raise ExportError(
            f"adapter name {name!r} is not usable as a file name; use letters, digits, "
            "'_', '-' or '.', e.g. --adapter fr=./lora-fr"
        )
    if names.reserved_adapter_name(name):
        own = ", ".join(repr(n) for n in names.RESERVED_NAMES)
        raise ExportError(
            f"adapter name {name!r} is reserved (the bundle's own files use {own} and names "
            f"starting with {names.RESERVED_PREFIX!r}); give it another with NAME=DIR"
        )
    return name


def cast_finite(
    name: str, tensors: Mapping[str, np.ndarray], precision: str, dtype: Any, *, why: str, fix: str
) -> dict[str, np.ndarray]:
    """The adapter's tensors in the bundle's dtype; values that overflow it are refused."""
    with np.errstate(over="ignore"):
        cast = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()}
    for key, value in cast.items():
        if not np.isfinite(value).all():
            raise ExportError(f"adapter {name}: {key} overflows {precision} ({why}); {fix}")
    return cast


def uninstall(stage: Path, manifest: Any, name: str) -> None:
    """`adapters remove` inside a staged update: drop the manifest entry and its file."""
    from peft_export.bundle.atomic import write_text
    from peft_export.bundle.paths import confined

    entry = manifest.adapters.installed.pop(name, None)
    if entry is None:
        have = ", ".join(sorted(manifest.adapters.installed)) or "none"
        raise ExportError(f"the bundle has no adapter {name!r} (installed: {have})")
    write_text(stage / names.MANIFEST, manifest.to_json())
    confined(stage, entry.file).unlink(missing_ok=True)


def check_new_adapter_name(name: str, installed: Mapping[str, object], *, replace: bool) -> None:
    """A name `adapters add` may install (`check_name`); an existing one needs --replace."""
    check_name(name)
    if name in installed and not replace:
        raise ExportError(
            f"the bundle already has an adapter {name!r}; pass --replace or pick another name"
        )


def read_adapter(
    path: str | Path,
    *,
    name: str | None = None,
    method: str | None = None,
    base: Any = None,
) -> AdapterSource:
    """Validate the folder (config, safetensors header, finiteness, shapes against `base`)."""
    path = Path(path)
    if method is not None and method not in METHODS:
        raise ExportError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if not path.is_dir():
        raise ExportError(
            f"adapter {path}: not a folder; pass the folder PEFT's save_pretrained wrote"
        )
    from peft_export.exporter.bottleneck.folder import is_library_folder, read_bottleneck

    if is_library_folder(path):
        if method is not None:
            raise ExportError(
                f"adapter {path} is a bottleneck adapter (adapters library) but --method "
                f"{method} was given; omit --method"
            )
        return read_bottleneck(path, name=name, base=base)
    name = check_name(name or path.resolve().name)
    config = _read_config(path)
    detected = detect_method(path, config)
    if method is not None and method != detected:
        raise ExportError(
            f"adapter {path} is a {detected} adapter but --method {method} was given; "
            f"pass --method {detected} or omit --method"
        )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).is_file():
            raise ExportError(
                f"adapter {path} has only pickled weights ({PICKLE_FILE}), which are never "
                "loaded; convert them once with 'peft-export adapters convert-bin "
                f"{path}' (opt-in, trusted files only)"
            )
        raise ExportError(
            f"adapter {path}: no {WEIGHTS_FILE}; re-save it with PEFT save_pretrained"
        )
    try:
        header = safetensors_io.read_header(weights)
    except BundleError as exc:
        raise ExportError(f"adapter {name}: {exc}") from None
    if not header.tensors:
        raise ExportError(f"adapter {weights}: holds no tensors; re-save it with PEFT")
    _check_float(weights, header, methods.method_for_config(config))
    _read_checked(weights, header)
    source = AdapterSource(name=name, path=path, method=detected, config=config, header=header)
    if base is not None:
        check_fits(source, base)
    return source


def detect_method(path: Path, config: dict[str, Any]) -> str:
    """The registry's method name for this config; a method no mode serves is refused here,
    with the registry's reason, before anything else reads the folder."""
    method = methods.method_for_config(config)
    if method is None:
        raise ExportError(
            f"adapter {path}: PEFT type {config.get('peft_type')!r} is not supported; "
            f"supported methods: {', '.join(METHODS)} ('peft-export methods' lists them)"
        )
    if not method.served:
        raise ExportError(f"adapter {path} is {method.label}: {method.merge_refusal}")
    return method.name


def check_fits(source: AdapterSource, base: Any) -> None:
    """Refuse an adapter whose tensors do not fit `base` (e.g. trained on another model)."""
    config = base.config
    spec = get_arch(config.model_type)
    if source.method in ("prefix_tuning", "cartridge") or source.method in _PROMPT_EMBEDS:
        embeddings = source.header.tensors.get("prompt_embeddings")
        if embeddings is None or len(embeddings.shape) != 2:
            raise ExportError(
                f"adapter {source.name}: no 2-D 'prompt_embeddings' tensor; re-save it with PEFT"
            )
        if source.method in ("prefix_tuning", "cartridge"):
            kv_dim = spec.num_kv_heads(config) * spec.head_dim(config)
            width = spec.num_layers(config) * 2 * kv_dim
        else:
            width = spec.hidden_size(config)
        if embeddings.shape[1] != width:
            raise ExportError(
                f"adapter {source.name}: prompt_embeddings is {list(embeddings.shape)} but the "
                f"base model needs width {width}; the adapter was trained on another base model: "
                "pass that base with --base"
            )
        return
    from peft_export.exporter.runtime_adapters.tokens import token_tensor_keys

    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    lokr: dict[str, dict[str, tuple[int, ...]]] = {}
    token_side = token_tensor_keys(source)
    hidden = spec.hidden_size(config)
    for key, info in source.header.tensors.items():
        if key in token_side:
            # Token rows and retrained embedding/head tables may cover added tokens: only
            # their width must be the base's (the token-bank conversion checks the rest).
            if len(info.shape) != 2 or info.shape[1] != hidden:
                _mismatch(source, key, info.shape, ("tokens", hidden))
            continue
        if key.startswith(_SHARED_PREFIX) and not key.startswith(_PEFT_PREFIX):
            continue  # a basis shared by every layer (VeRA's vera_A, ...): PEFT checks it
        inner = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        if inner in params:
            if tuple(params[inner].shape) != info.shape:
                _mismatch(source, inner, info.shape, params[inner].shape)
            continue
        module_path, part, is_bias = _split_part(inner)
        if source.config.get("target_parameters") and module_path.endswith(".base_layer"):
            module_path = _fused_owner(module_path)
        module = modules.get(module_path)
        if module is None and module_path.rpartition(".")[0] in modules:
            continue  # a part nested one level deeper (trainable tokens): PEFT checks it
        if module is None:
            _missing(source, module_path)
        fused = _fused_parameters(source, module_path, module)
        if fused:
            _check_fused(source, module_path, fused, part, info.shape)
            continue
        if part.startswith("lokr_"):
            lokr.setdefault(module_path, {})[part] = info.shape
        elif part in ("adaption_prompt", "adaption_gate"):
            hidden = spec.hidden_size(config)
            if part == "adaption_prompt" and info.shape[-1] != hidden:
                _mismatch(source, module_path, info.shape, (*info.shape[:-1], hidden))
        elif part in _SHAPED_PARTS:
            in_f, out_f = module_features(module)
            expected = (out_f,) if is_bias else _expected_shape(part, info.shape, in_f, out_f)
            if expected is not None and tuple(expected) != info.shape:
                _mismatch(source, module_path, info.shape, expected)
    for module_path, parts in lokr.items():
        in_f, out_f = module_features(modules[module_path])
        w1, w2 = _lokr_factor(parts, "lokr_w1"), _lokr_factor(parts, "lokr_w2")
        if w1 and w2 and (w1[0] * w2[0], w1[1] * w2[1]) != (out_f, in_f):
            got = (w1[0] * w2[0], w1[1] * w2[1])
            _mismatch(source, module_path, got, (out_f, in_f))


def _fused_owner(module_path: str) -> str:
    """PEFT nests one wrapper per targeted parameter: `experts.base_layer.base_layer` ->
    `experts`."""
    while module_path.endswith(".base_layer"):
        module_path = module_path.removesuffix(".base_layer")
    return module_path


def _fused_parameters(source: AdapterSource, module_path: str, module: Any) -> list[Any]:
    """The 3-D parameters [experts, out, in] of `module` that the adapter's
    `target_parameters` name (PEFT's LoRA on fused MoE expert weights)."""
    targets = source.config.get("target_parameters") or []
    return [
        param
        for name, param in module.named_parameters(recurse=False)
        if param.dim() == 3 and any(f"{module_path}.{name}".endswith(t) for t in targets)
    ]


def _check_fused(source: AdapterSource, module_path: str, params: list[Any], part, shape) -> None:
    """LoRA on a fused [experts, out, in] parameter: A [r*experts, in], B [out, r*experts]."""
    for param in params:
        experts, out_f, in_f = param.shape
        if len(shape) == 2 and part == "lora_A" and shape[1] == in_f and shape[0] % experts == 0:
            return
        if len(shape) == 2 and part == "lora_B" and shape[0] == out_f and shape[1] % experts == 0:
            return
    want = [list(p.shape) for p in params]
    _mismatch(source, f"{module_path} ({part})", shape, want)


def _lokr_factor(parts: dict[str, tuple[int, ...]], stem: str) -> tuple[int, int] | None:
    """Shape of one Kronecker factor, stored whole or as a low-rank pair (_a @ _b)."""
    if stem in parts and len(parts[stem]) == 2:
        return parts[stem][0], parts[stem][1]
    a, b = parts.get(f"{stem}_a"), parts.get(f"{stem}_b")
    if a and b and len(a) == 2 and len(b) == 2:
        return a[0], b[1]
    return None


def module_features(module: Any) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear or transformers Conv1D (weight [in, out])."""
    if hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nf") and hasattr(module, "nx"):
        return int(module.nx), int(module.nf)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[1]), int(weight.shape[0])
    raise ExportError(f"module {type(module).__name__} is not a linear layer; adapt linear layers")


def _split_part(inner: str) -> tuple[str, str, bool]:
    """Split `...q_proj.lora_B.bias` into (`...q_proj`, `lora_B`, is_bias=True)."""
    parts = inner.split(".")
    is_bias = parts[-1] == "bias"
    if parts[-1] in ("weight", "bias") and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts[:-1]), parts[-1], is_bias


def _expected_shape(part: str, shape, in_f: int, out_f: int) -> tuple[int, ...] | None:
    rank = shape[0] if shape else 0
    if part in ("lora_A", "hada_w1_b", "hada_w2_b"):
        return (rank, in_f)
    if part in ("lora_B", "hada_w1_a", "hada_w2_a"):
        return (out_f, shape[1] if len(shape) == 2 else 0)
    if part == "lora_magnitude_vector":
        return (out_f,)
    if part == "ia3_l":
        return (1, in_f) if shape and shape[0] == 1 and in_f != 1 else (out_f, 1)
    return None


def _missing(source: AdapterSource, module_path: str) -> None:
    raise ExportError(
        f"adapter {source.name} targets {module_path}, which the base model lacks; "
        "the adapter was trained on another base model: pass that base with --base"
    )


def _mismatch(source: AdapterSource, module_path: str, got, want) -> None:
    raise ExportError(
        f"adapter {source.name}: {module_path} has shape {list(got)} but the base model needs "
        f"{list(want)}; the adapter was trained on another base model: pass that base with --base"
    )


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ExportError(
            f"adapter {path}: no {CONFIG_FILE}; pass the folder PEFT's save_pretrained wrote"
        )
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise ExportError(f"{config_file}: too large for an adapter config; re-save it with PEFT")
    try:
        config = load_json(config_file.read_bytes(), where=str(config_file), fix=_RESAVE)
    except BundleError as exc:
        raise ExportError(str(exc)) from None
    if not isinstance(config, dict):
        raise ExportError(f"{config_file}: must hold a JSON object; re-save it with PEFT")
    return config


def _check_float(
    weights: Path, header: safetensors_io.SafetensorsHeader, method: methods.Method | None
) -> None:
    """Adapter weights are floating point; integer or bool tensors mean a broken file, except
    the index tensors a method declares (SHiRA's sparse positions)."""
    index_parts = method.index_parts if method is not None else ()
    for key, info in header.tensors.items():
        if info.dtype in INDEX_DTYPES and set(key.split(".")) & set(index_parts):
            continue
        if info.dtype not in FLOAT_DTYPES:
            raise ExportError(
                f"adapter {weights}: tensor {key!r} has dtype {info.dtype}, adapter weights are "
                f"{'/'.join(FLOAT_DTYPES)}; re-save the adapter with PEFT"
            )


def _read_checked(weights: Path, header: safetensors_io.SafetensorsHeader) -> dict[str, np.ndarray]:
    try:
        tensors = safetensors_io.read_tensors(weights, header)
        for key, info in header.tensors.items():
            if info.dtype == "BF16":
                tensors[key] = (tensors[key].astype(np.uint32) << 16).view(np.float32)
        safetensors_io.check_finite(weights, tensors)
    except BundleError as exc:
        raise ExportError(str(exc)) from None
    return tensors
