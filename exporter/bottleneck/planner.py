"""The pipeline planner for runtime-mode bottleneck adapters (exporter.pipeline.Planner).

Options it reads from `ExportContext.options`: `bottleneck_sites` ("all": every layer's
attention and feed-forward site, so any later adapter fits; default: the sites the given
adapters adapt), `bottleneck_size` (bank width; default: the widest adapter),
`bottleneck_activations` (list or comma-separated; default: the adapters' own), `slots`
(shared with the LoRA banks; default 8).
"""

from __future__ import annotations

from pathlib import Path

from peft_export.bundle import bottleneck as bn
from peft_export.bundle.manifest import AdapterLayout, BottleneckLayout, BottleneckSite
from peft_export.exporter.bottleneck.banks import BottleneckBanks, sites_of
from peft_export.exporter.bottleneck.convert import (
    ConvertedBottleneck,
    convert_bottleneck,
    fit_layout,
)
from peft_export.exporter.bottleneck.folder import refuse_saved_head
from peft_export.exporter.errors import ExportError
from peft_export.exporter.pipeline import ExportContext, RuntimePlan
from peft_export.exporter.runtime_adapters.bundle_adapters import install_all
from peft_export.exporter.runtime_adapters.planner import DEFAULT_SLOTS, _listed
from peft_export.models.architectures import ArchSpec

OPTION_KEYS = ("bottleneck_sites", "bottleneck_size", "bottleneck_activations")


def plan_bottleneck_banks(context: ExportContext) -> RuntimePlan | None:
    """Bottleneck banks for the bottleneck adapters given (or for the options asked)."""
    options = context.options
    sources = [s for s in context.sources if s.method == bn.METHOD]
    if not sources and not any(options.get(k) for k in OPTION_KEYS):
        return None
    spec = context.arch
    config = context.model.config
    hidden, num_layers = spec.hidden_size(config), spec.num_layers(config)
    for source in sources:
        refuse_saved_head(source)
    converted = [convert_bottleneck(s, spec, hidden, num_layers) for s in sources]
    layout = bank_layout(options, converted, spec, hidden, num_layers)
    slots = int(options.get("slots") or DEFAULT_SLOTS)
    banks = BottleneckBanks(spec, layout, slots=slots, dtype=context.dtype)
    fitted = [fit_layout(adapter, layout) for adapter in converted]

    def write_adapters(stage: Path, manifest_layout: AdapterLayout) -> None:
        install_all(stage, manifest_layout, fitted, context)

    return RuntimePlan(methods=(bn.METHOD,), extensions=[banks], write_adapters=write_adapters)


def bank_layout(
    options: dict,
    converted: list[ConvertedBottleneck],
    spec: ArchSpec,
    hidden: int,
    num_layers: int,
) -> BottleneckLayout:
    """The banks' sites, width and non-linearities from the options and the adapters (shared
    with encoder exports, exporter/encoders/bottleneck.py)."""
    sites = _sites(options.get("bottleneck_sites"), converted, spec, num_layers)
    return BottleneckLayout(
        hidden=hidden,
        size=_size(options.get("bottleneck_size"), converted),
        activations=_activations(options.get("bottleneck_activations"), converted),
        sites=[BottleneckSite(layer, location) for layer, location in sites],
    )


def _size(option: object, converted: list) -> int:
    widest = max((c.size for c in converted), default=0)
    if option is None:
        if not widest:
            raise ExportError("bottleneck banks need a width; pass --bottleneck-size (e.g. 64)")
        return widest
    size = int(option)
    if size < 1:
        raise ExportError("--bottleneck-size must be at least 1")
    return size


def _activations(option: object, converted: list) -> list[str]:
    wanted = set(_listed(option) or []) | {c.activation for c in converted}
    unknown = sorted(wanted - set(bn.ACTIVATIONS))
    if unknown:
        raise ExportError(
            f"--bottleneck-activations {', '.join(unknown)}: not graph activations; use some "
            f"of {', '.join(bn.ACTIVATIONS)}"
        )
    if not wanted:
        raise ExportError("bottleneck banks need a non-linearity; pass --bottleneck-activations")
    return [a for a in bn.ACTIVATIONS if a in wanted]


def _sites(option: object, converted: list, spec, num_layers: int) -> list[tuple[int, str]]:
    if option == "all":
        return sites_of(spec, num_layers)
    if option not in (None, ""):
        raise ExportError(f"--bottleneck-sites {option!r}: use 'all' or leave it out")
    used = {site for c in converted for site in c.sites}
    if not used:
        raise ExportError("bottleneck banks need sites; pass --bottleneck-sites all")
    return [s for s in sites_of(spec, num_layers) if s in used]
