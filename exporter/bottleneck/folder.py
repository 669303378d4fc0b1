"""Read a bottleneck adapter saved by the AdapterHub `adapters` library, without that library.

`model.save_adapter(DIR, NAME, use_safetensors=True)` writes `adapter_config.json` (the
library's BnConfig under "config", plus model_type, hidden_size, name, version) and
`adapter.safetensors` (per layer and location: adapter_down.0, adapter_up, optional scaling).
Every option the graph cannot reproduce exactly is refused here, before anything is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bundle import bottleneck as bn
from peft_export.bundle import safetensors_io
from peft_export.bundle.errors import BundleError
from peft_export.bundle.json_limits import load_json
from peft_export.exporter.adapter_source import MAX_CONFIG_BYTES, AdapterSource, check_name
from peft_export.exporter.errors import ExportError
from peft_export.models.architectures import ArchSpec, get_arch

CONFIG_FILE = "adapter_config.json"
SAFE_WEIGHTS = "adapter.safetensors"
PICKLE_WEIGHTS = "pytorch_adapter.bin"
_RESAVE = "model.save_adapter(DIR, NAME, use_safetensors=True)"

ACTIVATION_ALIASES = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "swish": "silu",
    "silu": "silu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "leakyrelu": "leaky_relu",
    "leaky_relu": "leaky_relu",
    "relu6": "relu6",
    "mish": "mish",
    "linear": "identity",
}
"""The library's `non_linearity` names (transformers' ACT2FN keys, lower-cased, plus its own
`leakyrelu`) mapped to the graph's (bundle/bottleneck.py ACTIVATIONS)."""

_REFUSED_OPTIONS = {
    "phm_layer": "PHM (Compacter) projections",
    "use_gating": "gating, whose mean over the sequence changes as a KV-cached row grows",
    "inv_adapter": "invertible adapters on the embeddings",
    "ln_before": "a layer norm inside the adapter (ln_before)",
    "ln_after": "a layer norm inside the adapter (ln_after)",
}
_PARAMS = {
    "adapter_down.0.weight": "down",
    "adapter_down.0.bias": "down_bias",
    "adapter_up.weight": "up",
    "adapter_up.bias": "up_bias",
    "scaling": "scaling",
}


@dataclass(frozen=True)
class SiteWeights:
    """One layer/location of a saved adapter, as the library stores it (float32)."""

    down: np.ndarray
    down_bias: np.ndarray
    up: np.ndarray
    up_bias: np.ndarray
    scaling: np.ndarray | None


def is_library_folder(path: str | Path) -> bool:
    """Whether `path` looks like an `adapters`-library save (not a PEFT one)."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file() or config_file.stat().st_size > MAX_CONFIG_BYTES:
        return False
    try:
        config = load_json(config_file.read_bytes(), where=str(config_file), fix="")
    except BundleError:
        return False
    return (
        isinstance(config, dict)
        and isinstance(config.get("config"), dict)
        and str(config.get("version", "")).startswith("adapters.")
    )


def read_bottleneck(
    path: str | Path, *, name: str | None = None, base: Any = None
) -> AdapterSource:
    """Validate a saved bottleneck adapter folder; the source's method is `bottleneck`."""
    path = Path(path)
    if not is_library_folder(path):
        raise ExportError(
            f"adapter {path}: not a folder the adapters library saved (adapter_config.json "
            f"with 'config' and 'version'); save it with {_RESAVE}"
        )
    name = check_name(name or path.resolve().name)
    config = load_json((path / CONFIG_FILE).read_bytes(), where=str(path), fix=_RESAVE)
    spec = get_arch(base.config.model_type) if base is not None else None
    check_config(path, config, spec, base.config if base is not None else None)
    weights = path / SAFE_WEIGHTS
    if not weights.is_file():
        if (path / PICKLE_WEIGHTS).is_file():
            raise ExportError(
                f"adapter {path} has only pickled weights ({PICKLE_WEIGHTS}), which are never "
                f"loaded; load it in the adapters library once and re-save it with {_RESAVE}"
            )
        raise ExportError(f"adapter {path}: no {SAFE_WEIGHTS}; re-save it with {_RESAVE}")
    try:
        header = safetensors_io.read_header(weights)
    except BundleError as exc:
        raise ExportError(f"adapter {name}: {exc}") from None
    source = AdapterSource(name=name, path=path, method=bn.METHOD, config=config, header=header)
    source.weights_file = weights
    if spec is not None:
        site_weights(source, spec, spec.hidden_size(base.config), spec.num_layers(base.config))
    return source


def check_config(
    path: Path, config: dict[str, Any], spec: ArchSpec | None, base_config: Any
) -> None:
    """Refuse what the graph cannot reproduce, naming the option and the fix; with a base
    (its family and HF config, or the manifest's copy of it), also what does not fit it."""
    bn_config = config["config"]
    arch = bn_config.get("architecture")
    if arch is not None:
        raise ExportError(
            f"adapter {path}: adapters-library {arch!r} adapters are not bottleneck adapters; "
            "only bottleneck configs (seq_bn, double_seq_bn, par_bn, ...) are exported"
        )
    for key, what in _REFUSED_OPTIONS.items():
        if bn_config.get(key):
            raise ExportError(
                f"adapter {path}: {key} ({what}) has no runtime graph form; retrain it with "
                f"{key} off"
            )
    activation(path, bn_config)
    scaling = bn_config.get("scaling", 1.0)
    if not isinstance(scaling, (int, float)) and scaling not in ("learned", "channel"):
        raise ExportError(
            f"adapter {path}: scaling {scaling!r} is unknown; use a number, 'learned' or 'channel'"
        )
    if spec is None:
        return
    if spec.bottleneck is None:
        raise ExportError(
            f"adapter {path}: bottleneck adapters are not supported on {spec.model_type}; "
            "add its `bottleneck` attachment in models/architectures.py"
        )
    if config.get("model_type") not in (None, spec.model_type):
        raise ExportError(
            f"adapter {path} was trained on a {config.get('model_type')} model, the base is "
            f"{spec.model_type}; pass the base it was trained on"
        )
    if int(config.get("hidden_size", -1)) != spec.hidden_size(base_config):
        raise ExportError(
            f"adapter {path} has hidden_size {config.get('hidden_size')}, the base "
            f"{spec.hidden_size(base_config)}; pass the base it was trained on"
        )
    post_ln = any(a.norm for a in spec.bottleneck.values())
    residual = bn_config.get("residual_before_ln", True)
    if residual == "post_add" and not bn_config.get("original_ln_before", False):
        raise ExportError(
            f"adapter {path}: residual_before_ln='post_add' needs original_ln_before=True "
            "(the library fails without it); use True or False"
        )
    if residual == "post_add" and not post_ln:
        raise ExportError(
            f"adapter {path}: residual_before_ln='post_add' needs a post-sublayer layer norm, "
            f"which {spec.model_type} does not have (the library fails on it too); use True"
        )
    if post_ln and not bn_config.get("original_ln_after", True):
        raise ExportError(
            f"adapter {path}: original_ln_after=False on {spec.model_type} skips the block's "
            "own layer norm, which the graph keeps; retrain with original_ln_after=True"
        )


def activation(path: Path, bn_config: dict[str, Any]) -> str:
    """The graph's name of the adapter's non-linearity."""
    raw = bn_config.get("non_linearity")
    canonical = ACTIVATION_ALIASES.get(str(raw).lower()) if raw is not None else "identity"
    if canonical is None:
        have = ", ".join(sorted(ACTIVATION_ALIASES))
        raise ExportError(
            f"adapter {path}: non_linearity {raw!r} is not supported (supported: {have}); "
            "retrain with one of those"
        )
    return canonical


def site_weights(
    source: AdapterSource, spec: ArchSpec, hidden: int, num_layers: int
) -> dict[tuple[int, str], SiteWeights]:
    """The saved tensors by (layer, location), checked for names, shapes and completeness."""
    if spec.bottleneck is None:
        raise ExportError(
            f"adapter {source.name}: bottleneck adapters are not supported on {spec.model_type}"
        )
    tensors = source.load_tensors()
    library_name = re.escape(str(source.config.get("name") or ""))
    patterns = {
        location: re.compile(
            r"(?:^|.*\.)"
            + re.escape(attach.saved).replace(re.escape("{layer}"), r"(\d+)")
            + rf"\.adapters\.{library_name or '[^.]+'}\.(.+)$"
        )
        for location, attach in spec.bottleneck.items()
    }
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = next(((loc, m) for loc, p in patterns.items() if (m := p.match(key))), (None, None))
        location, m = match
        part = _PARAMS.get(m.group(2)) if m else None
        if part is None:
            raise ExportError(
                f"adapter {source.name}: tensor {key!r} is not part of a plain bottleneck "
                f"adapter on {spec.model_type}; re-save it with {_RESAVE}"
            )
        found.setdefault((int(m.group(1)), location), {})[part] = value.astype(np.float32)
    _check_complete(source, spec, found, num_layers)
    return {site: _site(source, site, parts, hidden) for site, parts in sorted(found.items())}


def _check_complete(
    source: AdapterSource,
    spec: ArchSpec,
    found: dict[tuple[int, str], dict[str, np.ndarray]],
    num_layers: int,
) -> None:
    config = source.config["config"]
    leave_out = {int(i) % num_layers for i in config.get("leave_out") or []}
    wanted = [loc for loc in bn.LOCATIONS if config.get(loc) and loc in spec.bottleneck]
    extra = sorted({layer for layer, _ in found if layer >= num_layers})
    if extra:
        raise ExportError(
            f"adapter {source.name} has weights for layer {extra[0]}, the base has "
            f"{num_layers} layers; pass the base it was trained on"
        )
    for layer in range(num_layers):
        for location in wanted:
            if layer not in leave_out and (layer, location) not in found:
                raise ExportError(
                    f"adapter {source.name}: no weights for layer {layer} {location}, which its "
                    f"config adapts; re-save it with {_RESAVE}"
                )
    if not found:
        raise ExportError(f"adapter {source.name}: holds no adapter weights; re-save it")


def _site(
    source: AdapterSource, site: tuple[int, str], parts: dict[str, np.ndarray], hidden: int
) -> SiteWeights:
    missing = [p for p in ("down", "down_bias", "up", "up_bias") if p not in parts]
    if missing:
        raise ExportError(
            f"adapter {source.name}: layer {site[0]} {site[1]} lacks {', '.join(missing)}; "
            f"re-save it with {_RESAVE}"
        )
    size = parts["down"].shape[0] if parts["down"].ndim == 2 else -1
    shapes = {
        "down": (size, hidden),
        "down_bias": (size,),
        "up": (hidden, size),
        "up_bias": (hidden,),
    }
    scaling = parts.get("scaling")
    bad = [p for p, shape in shapes.items() if parts[p].shape != shape]
    if size < 1 or bad or (scaling is not None and scaling.shape not in ((1,), (hidden,))):
        raise ExportError(
            f"adapter {source.name}: layer {site[0]} {site[1]} has tensors of unexpected shapes "
            f"for hidden size {hidden}; pass the base it was trained on"
        )
    return SiteWeights(parts["down"], parts["down_bias"], parts["up"], parts["up_bias"], scaling)


SAVED_HEADS = ("model_head.safetensors", "pytorch_model_head.bin")
"""Files the library writes beside an adapter saved with its prediction head."""


def refuse_saved_head(source: AdapterSource) -> None:
    """A decoder bundle's output head is the base's lm_head: a head saved beside the adapter
    would be silently dropped, so such a folder is refused (encoders serve it: head banks)."""
    head = next((f for f in SAVED_HEADS if (Path(source.path) / f).is_file()), None)
    if head is not None:
        raise ExportError(
            f"adapter {source.name}: its folder holds a prediction head ({head}), which a "
            "decoder bundle does not serve (its output is the base's lm_head); re-save the "
            "adapter without it: save_adapter(DIR, NAME, with_head=False)"
        )
