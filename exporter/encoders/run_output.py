"""`peft-export run` on an encoder bundle: labels, tags, answers or vectors per text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import click

from peft_export.exporter.errors import ExportError


def run_encoder(
    bundle: Any,
    texts: Sequence[str],
    adapters: list[str | None] | None,
    contexts: Sequence[str],
    as_json: bool,
) -> None:
    """Print one line per text (one JSON object per text with `as_json`)."""
    rows = adapters if adapters is None or len(adapters) != 1 else adapters * len(texts)
    task = bundle.task
    if task == "question-answering":
        if len(contexts) not in (1, len(texts)):
            raise ExportError("question answering needs one --context per --prompt, or one for all")
        if not contexts:
            raise ExportError("this bundle answers questions: pass --context with the passage")
        contexts = list(contexts) * (len(texts) if len(contexts) == 1 else 1)
        results: list[Any] = bundle.answer(list(texts), contexts, rows)
    elif contexts:
        raise ExportError(f"--context is for question-answering bundles; this one is {task}")
    elif task == "sequence-classification":
        results = bundle.classify(list(texts), rows)
    elif task == "token-classification":
        results = bundle.tag(list(texts), rows)
    else:
        results = [[round(float(v), 6) for v in row] for row in bundle.embed(list(texts), rows)]
    for i, (text, result) in enumerate(zip(texts, results, strict=True)):
        adapter = rows[i] if rows else None
        if as_json:
            record = {"text": text, "adapter": adapter, "task": task, "result": _plain(result)}
            click.echo(json.dumps(record, ensure_ascii=False))
        else:
            click.echo(f"[{i}] {_line(task, result)}")


def _plain(result: Any) -> Any:
    if isinstance(result, list):
        return [_plain(r) for r in result]
    return asdict(result) if hasattr(result, "__dataclass_fields__") else result


def _line(task: str, result: Any) -> str:
    if task == "sequence-classification":
        return f"{result.label} ({result.score:.3f})"
    if task == "token-classification":
        return " ".join(f"{t.token}/{t.label}" for t in result)
    if task == "question-answering":
        return f"{result.text!r} ({result.score:.3f})"
    return "[" + ", ".join(f"{v:.6f}" for v in result) + "]"
