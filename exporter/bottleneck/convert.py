"""A saved bottleneck adapter in graph layout: per-site down/up slots, activation, mix.

The scale (a number, the learned scalar or the per-channel vector) is folded into `up` and
`up_bias` in float64, as LoRA's scale is folded into B. The residual options become the six
`mix` coefficients of bundle/bottleneck.py; per site, with N = norm(h + r) on post-LN families:

    sequential: x = h, or h + r (pre-LN) / N (post-LN) with original_ln_before;
                residual = h (residual_before_ln True), x (False), h + r ("post_add");
                output = residual + bottleneck(x), + r unless original_ln_after is off
    parallel:   x = r; output = h + bottleneck(x) (+ r as above)

and the block itself adds r after the site (pre-LN) or normalises output + r (post-LN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peft_export.bundle import bottleneck as bn
from peft_export.bundle.manifest import BottleneckLayout
from peft_export.exporter.adapter_source import AdapterSource
from peft_export.exporter.bottleneck.folder import SiteWeights, activation, site_weights
from peft_export.exporter.errors import ExportError
from peft_export.exporter.runtime_adapters.convert import SlotTensors
from peft_export.models.architectures import ArchSpec


@dataclass(frozen=True)
class SiteSlot:
    """One site of one adapter in graph layout, at the adapter's own bottleneck width."""

    down: np.ndarray
    down_bias: np.ndarray
    up: np.ndarray
    up_bias: np.ndarray
    mix: np.ndarray


@dataclass(frozen=True)
class ConvertedBottleneck:
    name: str
    source: str
    activation: str
    sites: dict[tuple[int, str], SiteSlot]

    @property
    def size(self) -> int:
        return max(s.down.shape[0] for s in self.sites.values())


def convert_bottleneck(
    source: AdapterSource, spec: ArchSpec, hidden: int, num_layers: int
) -> ConvertedBottleneck:
    """Read the folder's weights and turn them into per-site slots (unpadded)."""
    config = source.config["config"]
    weights = site_weights(source, spec, hidden, num_layers)
    post_ln = any(a.norm for a in (spec.bottleneck or {}).values())
    mix = mix_coefficients(config, post_ln=post_ln)
    sites = {site: _slot(w, config.get("scaling", 1.0), mix) for site, w in weights.items()}
    act = activation(source.path, config)
    return ConvertedBottleneck(source.name, str(source.path), act, sites)


def mix_coefficients(config: dict, *, post_ln: bool) -> np.ndarray:
    """The `mix` row (bn.MIX_COLUMNS order) of a BnConfig on a pre- or post-LN family."""
    col = dict.fromkeys(bn.MIX_COLUMNS, 0.0)
    before = bool(config.get("original_ln_before", False))
    after = bool(config.get("original_ln_after", True))
    residual = config.get("residual_before_ln", True)
    if config.get("is_parallel", False):
        col["x_drop_h"], col["x_add_r"] = 1.0, 1.0
        if not post_ln:
            col["o_add_r"] = float(after) - 1.0
        return np.array([col[c] for c in bn.MIX_COLUMNS], dtype=np.float64)
    if before and post_ln:
        col["x_drop_h"], col["x_add_n"] = 1.0, 1.0
    elif before:
        col["x_add_r"] = 1.0
    if residual is False and before:
        # the adapter's residual is its input x
        for term in ("drop_h", "add_r", "add_n"):
            col[f"o_{term}"] = col[f"x_{term}"]
    elif residual == "post_add" and before:
        col["o_add_r"] = 1.0
    if not post_ln:
        col["o_add_r"] += float(after) - 1.0
    return np.array([col[c] for c in bn.MIX_COLUMNS], dtype=np.float64)


def _slot(w: SiteWeights, scaling: object, mix: np.ndarray) -> SiteSlot:
    if w.scaling is not None:
        scale = w.scaling.astype(np.float64)
    elif isinstance(scaling, (int, float)):
        scale = np.array([float(scaling)])
    else:
        raise ExportError(f"scaling {scaling!r} needs its learned tensor, which the file lacks")
    up = w.up.astype(np.float64) * scale[:, None]
    up_bias = w.up_bias.astype(np.float64) * scale
    return SiteSlot(w.down, w.down_bias, up, up_bias, mix)


def fit_layout(adapter: ConvertedBottleneck, layout: BottleneckLayout) -> SlotTensors:
    """Pad the adapter to the graph's width and activation list; refuse what does not fit."""
    sites = {(s.layer, s.location) for s in layout.sites}
    missing = sorted(set(adapter.sites) - sites)
    if missing:
        layer, location = missing[0]
        raise ExportError(
            f"adapter {adapter.name} adapts layer {layer} {location}, which the graph has no "
            "bottleneck banks for; re-export with --bottleneck-sites all (or with this adapter)"
        )
    if adapter.size > layout.size:
        raise ExportError(
            f"adapter {adapter.name} has bottleneck width {adapter.size}, the graph's banks "
            f"hold {layout.size}; re-export with --bottleneck-size {adapter.size}"
        )
    if adapter.activation not in layout.activations:
        raise ExportError(
            f"adapter {adapter.name} uses the non-linearity {adapter.activation}, the graph has "
            f"{', '.join(layout.activations)}; re-export with --bottleneck-activations "
            f"including {adapter.activation}"
        )
    act = np.zeros(len(layout.activations))
    act[layout.activations.index(adapter.activation)] = 1.0
    tensors: dict[str, np.ndarray] = {}
    for site, slot in adapter.sites.items():
        width = slot.down.shape[0]
        padded = {
            "down": _pad(slot.down, (layout.size, layout.hidden), width, axis=0),
            "down_bias": _pad(slot.down_bias, (layout.size,), width, axis=0),
            "up": _pad(slot.up, (layout.hidden, layout.size), width, axis=1),
            "up_bias": slot.up_bias,
            "act": act,
            "mix": slot.mix,
        }
        for part, value in padded.items():
            tensors[bn.bank_input(*site, part)] = value
    return SlotTensors(adapter.name, bn.METHOD, adapter.size, adapter.source, tensors)


def _pad(value: np.ndarray, shape: tuple[int, ...], width: int, axis: int) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float64)
    index = [slice(None)] * len(shape)
    index[axis] = slice(0, width)
    out[tuple(index)] = value
    return out
