"""The pipeline planner for prompt-side runtime inputs (exporter.pipeline.Planner).

Options it reads from `ExportContext.options`: `prefix_max_len`, `prompt_max_len` and
`adaption_max_len`. Each defaults to the longest given adapter of its methods; a method
with neither an adapter nor an option gets no inputs, so the graph stays as small as asked.
"""

from __future__ import annotations

from pathlib import Path

from peft_export.bundle.manifest import AdapterLayout
from peft_export.exporter.pipeline import ExportContext, RuntimePlan
from peft_export.exporter.prompt_adapters.adaption import AdaptionExtension
from peft_export.exporter.prompt_adapters.bundle_adapters import (
    adaption_base_weights,
    install_prompt_adapter,
    write_adaption_base,
)
from peft_export.exporter.prompt_adapters.convert import (
    ADAPTION_PROMPT,
    CARTRIDGE,
    PREFIX_TUNING,
    PROMPT_EMBEDS_METHODS,
    PROMPT_METHODS,
    check_bounds,
    convert_prompt_adapter,
)
from peft_export.exporter.prompt_adapters.prefix import PrefixExtension
from peft_export.exporter.prompt_adapters.prompt_embeds import PromptEmbedsExtension
from peft_export.exporter.prompt_adapters.target import PromptTarget

_GROUPS = {
    "prefix_max_len": (PREFIX_TUNING, CARTRIDGE),
    "prompt_max_len": PROMPT_EMBEDS_METHODS,
    "adaption_max_len": (ADAPTION_PROMPT,),
}


def plan_prompt_inputs(context: ExportContext) -> RuntimePlan | None:
    """Graph inputs for the prompt-side adapters given (or for the lengths asked)."""
    sources = [s for s in context.sources if s.method in PROMPT_METHODS]
    bounds = {key: int(context.options.get(key) or 0) for key in _GROUPS}
    if not sources and not any(bounds.values()):
        return None
    model = context.model
    adaption = bounds["adaption_max_len"] or any(s.method == ADAPTION_PROMPT for s in sources)
    weights = adaption_base_weights(model) if adaption else None
    provisional = PromptTarget.from_config(
        model.config, context.base_weights_sha256, **{k: 1 << 30 for k in _GROUPS}
    )
    converted = [convert_prompt_adapter(s, provisional, base_weights=weights) for s in sources]
    for key, methods in _GROUPS.items():
        if not bounds[key]:
            bounds[key] = max((a.length for a in converted if a.method in methods), default=0)
    target = PromptTarget.from_config(model.config, context.base_weights_sha256, **bounds)
    for adapter in converted:
        check_bounds(adapter, target)
    prefix, prompt, adaption_len = (bounds[key] for key in _GROUPS)
    extensions = []
    if prefix:
        extensions.append(PrefixExtension(prefix))
    if prompt:
        extensions.append(PromptEmbedsExtension(target.hidden_size, prompt, context.dtype))
    if adaption_len:
        extensions.append(AdaptionExtension(model.config, adaption_len, context.dtype))
    served = tuple(m for key, methods in _GROUPS.items() if bounds[key] for m in methods)

    def write_adapters(stage: Path, layout: AdapterLayout) -> None:
        if weights is not None:
            write_adaption_base(stage, weights)
        for adapter in converted:
            install_prompt_adapter(stage, layout, adapter, target, precision=context.precision)

    return RuntimePlan(methods=served, extensions=extensions, write_adapters=write_adapters)
