"""`peft-export inspect`: what a bundle holds, read from its manifest (nothing is loaded)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import click

_LAYER = re.compile(r"\.(\d+)\.")


@click.command("inspect")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(bundle: str, as_json: bool) -> None:
    """Show BUNDLE's base model, mode, precision, graph interface, adapters and engines."""
    summary = summarize(Path(bundle))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(render(summary))


def summarize(root: Path) -> dict[str, Any]:
    """A JSON-able summary of the bundle at `root`."""
    from peft_export.bundle.manifest import load_manifest
    from peft_export.bundle.paths import confined

    manifest = load_manifest(root)
    layout = manifest.adapters
    graph_path = confined(root, manifest.graph.file)
    graph_bytes = sum(
        p.stat().st_size
        for p in (graph_path, graph_path.with_name(graph_path.name + ".data"))
        if p.is_file()
    )
    return {
        "bundle": str(root),
        "schema_version": manifest.schema_version,
        "base_model": {
            "source": manifest.base_model.source,
            "architecture": manifest.base_model.architecture,
            "weights_sha256": manifest.base_model.weights_sha256,
        },
        "mode": manifest.mode,
        "precision": manifest.precision,
        "opset": manifest.opset,
        "graph": {
            "file": manifest.graph.file,
            "bytes": graph_bytes,
            "ort_fusions": manifest.graph.ort_fusions,
            "inputs": _collapse(manifest.graph.inputs),
            "outputs": _collapse(manifest.graph.outputs),
        },
        "kv": None
        if manifest.encoder is not None
        else {
            "num_layers": manifest.kv.num_layers,
            "num_kv_heads": manifest.kv.num_kv_heads,
            "head_dim": manifest.kv.head_dim,
            "dtype": manifest.kv.dtype,
        },
        "encoder": _encoder(manifest.encoder),
        "quantization": _quantization(manifest.quantization),
        "vocab_size": manifest.vocab_size,
        "hidden_size": manifest.hidden_size,
        "adapters": {
            "methods": layout.methods,
            "slots": layout.slots,
            "r_max": layout.r_max,
            "modules": len(layout.modules),
            "prefix_max_len": layout.prefix_max_len,
            "prompt_max_len": layout.prompt_max_len,
            "merged": layout.merged,
            "installed": {
                name: {"method": a.method, "rank": a.rank, "file": a.file}
                for name, a in layout.installed.items()
            },
        },
        "tokenizer": {
            "file": manifest.tokenizer.file,
            "chat_template": manifest.tokenizer.chat_template is not None,
            "eos_token_ids": manifest.tokenizer.eos_token_ids,
        },
        "engines": [
            {
                "file": e.file,
                "backend": e.backend,
                "precision": e.precision,
                "compute_capability": e.compute_capability,
                "lora_impl": e.lora_impl,
                "present": confined(root, e.file).is_file(),
            }
            for e in manifest.engines
        ],
        "parity": _parity(root),
        "producer": manifest.producer,
    }


def _encoder(encoder: Any) -> dict[str, Any] | None:
    """Encoder bundles have no KV cache; what they compute is the task and its labels."""
    if encoder is None:
        return None
    return {
        "task": encoder.task,
        "max_length": encoder.max_length,
        "max_labels": encoder.max_labels,
        "pooling": encoder.pooling,
    }


def _quantization(quant: Any) -> dict[str, Any] | None:
    """Which layers hold block-quantized weights, at which width, and which stayed float."""
    if quant is None:
        return None
    layers = Counter(f"{module.source} int{module.bits}" for module in quant.modules.values())
    return {
        "bits": quant.bits,
        "block_size": quant.block_size,
        "format": quant.format,
        "accuracy_level": quant.accuracy_level,
        "layers": dict(layers),
        "token_table": bool(quant.embedding),
        "kept": dict(quant.kept),
    }


def _collapse(specs: list[Any]) -> list[dict[str, Any]]:
    """One entry per tensor family: per-layer KV names become `{0..N-1}`."""
    groups: dict[str, dict[str, Any]] = {}
    for spec in specs:
        layers = [int(m) for m in _LAYER.findall(spec.name)]
        key = _LAYER.sub(".{i}.", spec.name, count=1) if layers else spec.name
        entry = groups.setdefault(
            key, {"name": key, "dtype": spec.dtype, "shape": spec.shape, "count": 0}
        )
        entry["count"] += 1
    for entry in groups.values():
        if entry["count"] > 1 or "{i}" in entry["name"]:
            entry["name"] = entry["name"].replace("{i}", f"{{0..{entry['count'] - 1}}}")
    return list(groups.values())


def _parity(root: Path) -> dict[str, Any] | None:
    """Top-level scalars of reports/parity.json (its details stay in the file)."""
    from peft_export.bundle import names

    path = root / names.PARITY_REPORT
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"error": f"{names.PARITY_REPORT} is not valid JSON; run 'peft-export verify'"}
    if not isinstance(report, dict):
        return {"error": f"{names.PARITY_REPORT} is not an object; run 'peft-export verify'"}
    return {k: v for k, v in report.items() if isinstance(v, str | int | float | bool)}


def _adapter_label(name: str, adapter: dict[str, Any]) -> str:
    rank = f", r{adapter['rank']}" if adapter["rank"] else ""
    return f"{name} ({adapter['method']}{rank})"


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def render(summary: dict[str, Any]) -> str:
    base = summary["base_model"]
    graph = summary["graph"]
    adapters = summary["adapters"]
    lines = [
        f"bundle      {summary['bundle']}",
        f"base        {base['source']} ({base['architecture']})",
        f"mode        {summary['mode']}    precision {summary['precision']}    "
        f"opset {summary['opset']}",
        f"graph       {graph['file']} ({graph['bytes'] / 1e6:.1f} MB)"
        + (f", fused for ONNX Runtime ({graph['ort_fusions']})" if graph["ort_fusions"] else ""),
    ]
    width = max(len(e["name"]) for e in graph["inputs"] + graph["outputs"]) + 2
    for title, entries in (("inputs", graph["inputs"]), ("outputs", graph["outputs"])):
        lines.append(f"  {title}")
        lines += [f"    {e['name']:<{width}}{e['dtype']:<9}{_shape(e['shape'])}" for e in entries]
    kv, encoder, quant = summary["kv"], summary["encoder"], summary["quantization"]
    if kv is not None:
        lines.append(
            f"kv cache    {kv['num_layers']} layers x {kv['num_kv_heads']} heads x "
            f"{kv['head_dim']} dims, {kv['dtype']}"
        )
    if encoder is not None:
        labels = f", up to {encoder['max_labels']} labels" if encoder["max_labels"] else ""
        lines.append(f"encoder     {encoder['task']}, <= {encoder['max_length']} tokens{labels}")
    if quant is not None:
        layers = ", ".join(f"{n} {kind}" for kind, n in sorted(quant["layers"].items()))
        table = "; token table quantized" if quant["token_table"] else ""
        kept = f"; {len(quant['kept'])} kept float" if quant["kept"] else ""
        lines.append(
            f"quantized   block {quant['block_size']}, {quant['format']}, accuracy level "
            f"{quant['accuracy_level']}: {layers}{table}{kept}"
        )
    if adapters["merged"]:
        merged = adapters["merged"]
        lines.append(f"merged      {merged.get('name')} ({merged.get('method')})")
    if summary["mode"] == "runtime":
        lines.append(
            f"adapters    methods {', '.join(adapters['methods']) or '-'}; "
            f"{adapters['slots']} slots, r_max {adapters['r_max']}, "
            f"{adapters['modules']} modules, prefix <= {adapters['prefix_max_len']}, "
            f"prompt <= {adapters['prompt_max_len']}"
        )
        installed = adapters["installed"]
        listing = ", ".join(_adapter_label(n, a) for n, a in installed.items())
        lines.append(f"installed   {listing or 'none'}")
    tokenizer = summary["tokenizer"]
    template = "with chat template" if tokenizer["chat_template"] else "no chat template"
    lines.append(f"tokenizer   {tokenizer['file'] or 'none'} ({template})")
    engines = summary["engines"] or []
    lines.append(f"engines     {len(engines) or 'none'}")
    for e in engines:
        state = "" if e["present"] else "  [file missing]"
        lines.append(
            f"    {e['file']}  {e['backend']} {e['precision']} "
            f"sm{e['compute_capability'] or '?'} lora={e['lora_impl']}{state}"
        )
    parity = summary["parity"]
    if parity is None:
        lines.append("parity      not verified (run 'peft-export verify')")
    else:
        lines.append("parity      " + ", ".join(f"{k}={v}" for k, v in parity.items()))
    return "\n".join(lines)
