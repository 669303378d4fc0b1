"""`peft-export build-engine`: build a TensorRT engine for an existing bundle."""

from __future__ import annotations

from typing import Any

import click

from peft_export.exporter.engines.build import add_engine_options


@click.command("build-engine")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=str))
@click.option("--quiet", is_flag=True, help="No progress display.")
def _command(bundle: str, quiet: bool, **params: Any) -> None:
    """Build a TensorRT engine for BUNDLE's graph and record it in its manifest.

    Two optimization profiles are built: prefill (--seq tokens over a past of 0..--past max)
    and decode (one token over --past). Rebuilds of the same graph and options come from
    the engine cache. The engine and the manifest change as one step: an interrupted build
    leaves the bundle as it was.
    """
    import dataclasses
    from pathlib import Path

    from peft_export.bundle.atomic import staged_update
    from peft_export.bundle.manifest import load_manifest
    from peft_export.exporter.engines.build import build_engines, engine_options

    load_manifest(bundle)
    options = dataclasses.replace(engine_options(params), progress=not quiet)
    with staged_update(Path(bundle)) as stage:
        record = build_engines(stage, load_manifest(bundle), options)
    targets = f" for sm {record.compute_capability}" if record.compute_capability else ""
    click.echo(f"{record.file}: {record.backend} {record.version}, {record.precision}{targets}")


command = add_engine_options(_command)
