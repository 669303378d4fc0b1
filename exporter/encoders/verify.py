"""`verify` for encoder bundles: the bundle's outputs against PyTorch/PEFT, adapter by adapter.

The reference loads the base checkpoint as the task model (with each adapter's head size),
applies the adapter with PEFT and calls the model PEFT injected (PEFT's QA wrapper drops
`token_type_ids`, which the model uses); embeddings are pooled as the bundle's manifest says.
Both sides see the same token ids (the bundle's tokenizer), so the comparison is the graph's.
A runtime bundle also runs every adapter side by side in one batch, which must equal each row
run alone. Bottleneck adapters (`adapters` library) have no PEFT reference: they join only the
mixed batch, and the report lists them under `not_verified`.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peft_export.bundle import bottleneck as bn
from peft_export.bundle import names
from peft_export.bundle.atomic import write_text
from peft_export.bundle.manifest import Manifest
from peft_export.bundle.paths import confined
from peft_export.bundle.safetensors_io import read_header
from peft_export.exporter.bottleneck import NO_LIBRARY_REFERENCE
from peft_export.exporter.encoders.base import load_task_model
from peft_export.exporter.encoders.export import encoder_checkpoint
from peft_export.exporter.encoders.wrapper import pool
from peft_export.exporter.errors import ExportError
from peft_export.models.encoders import get_encoder

DEFAULT_TEXTS = (
    "The film was a delight from start to finish.",
    "Service was slow and the food arrived cold.",
    "Parliament passed the new budget late on Tuesday.",
    "The home team won the final in extra time.",
)
DEFAULT_CONTEXT = "Paris is the capital and largest city of France, on the river Seine."


def verify_encoder(
    root: Path,
    manifest: Manifest,
    *,
    texts: Sequence[str] = (),
    adapters: Sequence[str] | None = None,
    sources: dict[str, str] | None = None,
    atol: float = 1e-4,
    base_source: str | None = None,
) -> dict[str, Any]:
    """Compare each adapter (and the base, where it has a head) with PyTorch/PEFT."""
    from peft_export.runtime import load_bundle

    info = manifest.encoder
    assert info is not None
    texts = list(texts) or list(DEFAULT_TEXTS)
    folder = encoder_checkpoint(base_source or manifest.base_model.source)
    if folder is None:
        raise ExportError(
            f"base {manifest.base_model.source!r} is not available as an encoder checkpoint; "
            "pass --base with the model the bundle was exported from"
        )
    bundle = load_bundle(root, threads=None)
    pairs = [DEFAULT_CONTEXT] * len(texts) if info.task == "question-answering" else None
    encoded = bundle.encode(texts, pairs)
    targets = _targets(root, manifest, adapters, sources or {})
    reports = []
    for name, source in targets:
        reference = _reference(folder, bundle, source, encoded, name)
        got = bundle.run(encoded, [name] * len(texts))
        errors = {}
        for output, value in reference.items():
            errors[output] = float(np.abs(got[output][..., : value.shape[-1]] - value).max())
        same = _same_predictions(info.task, got, reference)
        worst = max(errors.values())
        reports.append(
            {
                "adapter": name,
                "max_abs": errors,
                "predictions_identical": same,
                "passed": worst <= atol and same,
            }
        )
    unverified = [
        name
        for name, record in manifest.adapters.installed.items()
        if record.method == bn.METHOD and not adapters
    ]
    mixed = _mixed_batch(bundle, [n for n, _ in targets] + unverified, texts, pairs)
    passed = all(r["passed"] for r in reports) and mixed.get("identical", True)
    result = {
        "bundle": str(root),
        "mode": manifest.mode,
        "task": info.task,
        "tolerance": {"atol": atol},
        "texts": texts,
        "adapters": reports,
        "mixed_batch": mixed,
        "not_verified": {name: NO_LIBRARY_REFERENCE for name in unverified},
        "passed": passed,
        "host": platform.platform(),
    }
    write_text(confined(root, names.PARITY_REPORT, lexical_only=True), json.dumps(result, indent=2))
    return result


def _targets(
    root: Path, manifest: Manifest, only: Sequence[str] | None, sources: dict[str, str]
) -> list[tuple[str | None, Path | None]]:
    layout = manifest.adapters
    info = manifest.encoder
    base_ok = info.base_head or not info.max_labels
    if manifest.mode == "merged":
        merged = layout.merged
        if not merged:
            return [(None, None)]
        path = sources.get(merged["name"], merged.get("source"))
        return [(merged["name"], _source_dir(merged["name"], path))]
    targets: list[tuple[str | None, Path | None]] = [(None, None)] if base_ok else []
    unknown = set(only or ()) - set(layout.installed)
    if unknown:
        raise ExportError(f"adapter(s) {', '.join(sorted(unknown))} are not in the bundle")
    for name, record in layout.installed.items():
        if only and name not in only:
            continue
        if record.method == bn.METHOD:
            if only:
                raise ExportError(f"adapter {name}: {NO_LIBRARY_REFERENCE}; verify the others")
            continue
        header = read_header(confined(root, record.file))
        targets.append((name, _source_dir(name, sources.get(name, header.metadata.get("source")))))
    return targets


def _source_dir(name: str, path: str | None) -> Path:
    if not path or not Path(path).is_dir():
        raise ExportError(
            f"the PEFT folder of adapter {name!r} ({path}) is not available; "
            f"pass --source {name}=DIR to verify against it"
        )
    return Path(path)


@torch.no_grad()
def _reference(
    folder: Path, bundle: Any, source: Path | None, encoded: Any, name: str | None
) -> dict[str, np.ndarray]:
    manifest = bundle.manifest
    info = manifest.encoder
    labels = len(bundle.labels(name)) if info.max_labels else None
    model, _ = load_task_model(folder, info.task, num_labels=labels)
    if source is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source)).get_base_model().eval()
    feeds = {
        "input_ids": torch.tensor(encoded.input_ids),
        "attention_mask": torch.tensor(encoded.attention_mask),
    }
    if get_encoder(manifest.base_model.architecture).token_type_ids:
        feeds["token_type_ids"] = torch.tensor(encoded.token_type_ids)
    out = model(**feeds)
    if info.task == "feature-extraction":
        pooled = pool(out.last_hidden_state, feeds["attention_mask"], info.pooling)
        return {"embeddings": pooled.numpy()}
    return {output: getattr(out, output).numpy() for output in info.outputs}


def _same_predictions(task: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> bool:
    if task == "feature-extraction":
        return True
    return all(
        np.array_equal(got[k][..., : v.shape[-1]].argmax(-1), v.argmax(-1)) for k, v in ref.items()
    )


def _mixed_batch(
    bundle: Any, adapters: list[str | None], texts: list[str], pairs: list[str] | None
) -> dict[str, Any]:
    if bundle.manifest.mode != "runtime" or len(adapters) < 2:
        return {}
    rows = [adapters[i % len(adapters)] for i in range(max(len(texts), len(adapters)))]
    row_texts = [texts[i % len(texts)] for i in range(len(rows))]
    row_pairs = [pairs[0]] * len(rows) if pairs else None
    together = bundle.run(bundle.encode(row_texts, row_pairs), rows)
    worst = 0.0
    for i, adapter in enumerate(rows):
        alone = bundle.run(
            bundle.encode([row_texts[i]], [row_pairs[i]] if row_pairs else None), [adapter]
        )
        for key, value in alone.items():
            same_rows = together[key][(slice(i, i + 1), *(slice(0, d) for d in value.shape[1:]))]
            worst = max(worst, float(np.abs(same_rows - value).max()))
    return {"rows": len(rows), "max_abs": worst, "identical": worst <= 1e-5}
