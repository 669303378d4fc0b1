"""`peft-export verify`: parity of a bundle against PyTorch/PEFT, written to reports/parity.json."""

from __future__ import annotations

import sys

import click


@click.command("verify")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--prompt", "prompts", multiple=True, help="Prompt to compare on (repeatable).")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option(
    "--decode-steps",
    default=8,
    show_default=True,
    type=click.IntRange(0),
    help="Decode steps whose logits are compared (after the prefill step).",
)
@click.option("--adapter", "adapters", multiple=True, help="Only these runtime adapters.")
@click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="NAME=DIR",
    help="PEFT folder of an adapter, when it moved since export.",
)
@click.option("--base", "base_source", default=None, help="Base model, when it moved since export.")
@click.option(
    "--atol", type=float, default=None, help="Max abs logits error (default by precision)."
)
@click.option(
    "--min-greedy",
    type=click.FloatRange(0, 1),
    default=None,
    help="Fraction of prompts whose greedy tokens must be identical (default by precision).",
)
@click.option(
    "--engine",
    type=click.Choice(["ort", "trt"]),
    default="ort",
    show_default=True,
    help="Runtime backend to verify: ONNX Runtime or the bundle's TensorRT engine.",
)
def command(
    bundle: str,
    prompts: tuple[str, ...],
    max_new_tokens: int,
    decode_steps: int,
    adapters: tuple[str, ...],
    sources: tuple[str, ...],
    base_source: str | None,
    atol: float | None,
    min_greedy: float | None,
    engine: str,
) -> None:
    """Compare BUNDLE with the PyTorch/PEFT model; exit 1 when a tolerance is exceeded."""
    from dataclasses import replace

    from peft_export.bundle.manifest import load_manifest
    from peft_export.exporter.errors import ExportError
    from peft_export.exporter.verify import DEFAULT_PROMPTS, Tolerance, verify_bundle

    pairs = {}
    for item in sources:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ExportError(
                f"--source {item!r} is not NAME=DIR; write e.g. --source fr=./lora-fr"
            )
        pairs[name] = path
    manifest = load_manifest(bundle)
    tolerance = Tolerance.for_precision(manifest.precision)
    if manifest.encoder is not None:
        tolerance = replace(tolerance, atol=1e-4)  # no generation: logits or vectors only
    if atol is not None:
        tolerance = replace(tolerance, atol=atol)
    if min_greedy is not None:
        tolerance = replace(tolerance, min_greedy_agreement=min_greedy)
    if engine == "trt":
        from peft_export.exporter.engines.verify import require_trt_execution

        require_trt_execution(bundle)
    report = verify_bundle(
        bundle,
        prompts=prompts or DEFAULT_PROMPTS,
        max_new_tokens=max_new_tokens,
        decode_steps=decode_steps,
        adapters=adapters or None,
        sources=pairs,
        tolerance=tolerance,
        backend=engine,
        base_source=base_source,
    )
    verdict = "passed" if report["passed"] else "FAILED"
    click.echo(f"parity {verdict}; report written to {bundle}/reports/parity.json")
    for name, why in report.get("not_verified", {}).items():
        click.echo(f"not verified: {name}: {why}")
    if not report["passed"]:
        sys.exit(1)
