"""Runtime LoRA-bank bundles of tiny models, built the way users build them: export with
one adapter, then `adapters add` the rest."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks


def lora_bundle(
    base,
    out: Path,
    exported: str,
    adapters: Mapping[str, Path],
    *,
    slots: int,
    max_rank: int = 4,
    methods: str | None = None,
) -> Path:
    """Export `out` serving adapters[exported], then add the other `adapters` in order."""
    options = {"max_rank": max_rank, "slots": slots}
    if methods is not None:
        options["methods"] = methods
    export_bundle(
        InMemoryBase(base),
        [(exported, adapters[exported])],
        out=out,
        mode="runtime",
        planners=[plan_lora_banks],
        options=options,
    )
    for name, folder in adapters.items():
        if name != exported:
            add_adapter(out, name, folder)
    return out
