"""`peft-export adapters add|list|remove|convert-bin`: manage a runtime bundle's adapters."""

from __future__ import annotations

import json
from pathlib import Path

import click

from peft_export.exporter.errors import ExportError


@click.group("adapters")
def command() -> None:
    """Add, list or remove a bundle's adapters (no re-export).

    Runtime bundles take them into their banks or prompt inputs; merged bundles get refit sets
    that swap the merged adapter of a TensorRT engine built with --refit.
    """


@command.command("add")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("adapters", nargs=-1, required=True)
@click.option("--replace", is_flag=True, help="Replace an installed adapter of the same name.")
@click.option(
    "--onnx-adapter",
    is_flag=True,
    help="Also write adapters/NAME.onnx_adapter for ONNX Runtime's RunOptions.add_active_adapter.",
)
@click.option(
    "--base",
    default=None,
    help="Merged bundles: the base model, when it moved since export (default: the manifest's).",
)
def add(
    bundle: str, adapters: tuple[str, ...], replace: bool, onnx_adapter: bool, base: str | None
) -> None:
    """Install NAME=PEFT_DIR adapters into BUNDLE (banks, prompt inputs or refit sets)."""
    from peft_export.exporter.adapter_source import parse_adapter_arg, read_adapter
    from peft_export.exporter.bottleneck.bundle_adapters import add_bottleneck_adapter
    from peft_export.exporter.engines.refit_adapters import add_refit_adapter
    from peft_export.exporter.prompt_adapters.bundle_adapters import add_prompt_adapter
    from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
    from peft_export.exporter.runtime_adapters.norm_tuning import add_ln_tuning_adapter

    merged = _mode(bundle) == "merged"
    if merged and onnx_adapter:
        raise ExportError("--onnx-adapter applies to runtime bundles; drop it for a merged one")
    for value in adapters:
        name, path = parse_adapter_arg(value)
        name = name or Path(path).resolve().name
        if merged:
            entry = add_refit_adapter(bundle, name, path, base=base, replace=replace)
            click.echo(
                f"added {name} ({entry.method}) -> {entry.file}: a refit set for TensorRT "
                "engines built with --refit"
            )
            continue
        source = read_adapter(path, name=name)
        if source.method == "bottleneck":
            if onnx_adapter:
                raise ExportError("--onnx-adapter takes LoRA-family adapters; drop it")
            entry = add_bottleneck_adapter(bundle, name, path, replace=replace)
        elif source.method == "ln_tuning":
            if onnx_adapter:
                raise ExportError("--onnx-adapter takes LoRA-family adapters; drop it")
            entry = add_ln_tuning_adapter(bundle, name, path, replace=replace)
        elif source.prompt_side:
            entry = add_prompt_adapter(bundle, name, path, replace=replace)
        else:
            entry = add_adapter(bundle, name, path, replace=replace, onnx_adapter=onnx_adapter)
        click.echo(f"added {name} ({entry.method}, rank {entry.rank}) -> {entry.file}")


@command.command("list")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(bundle: str, as_json: bool) -> None:
    """List BUNDLE's installed adapters."""
    from peft_export.exporter.bundle_files import read_manifest

    installed = read_manifest(bundle).adapters.installed
    if as_json:
        click.echo(json.dumps({k: vars(v) for k, v in installed.items()}, indent=2))
        return
    for name, entry in sorted(installed.items()):
        click.echo(f"{name}\t{entry.method}\trank {entry.rank}\t{entry.file}")


@command.command("remove")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("names", nargs=-1, required=True)
def remove(bundle: str, names: tuple[str, ...]) -> None:
    """Remove adapters NAMES from BUNDLE."""
    from peft_export.exporter.engines.refit_adapters import remove_refit_adapter
    from peft_export.exporter.runtime_adapters.bundle_adapters import remove_adapter

    remove_one = remove_refit_adapter if _mode(bundle) == "merged" else remove_adapter
    for name in names:
        remove_one(bundle, name)
        click.echo(f"removed {name}")


@command.command("convert-bin")
@click.argument("peft_dir", type=click.Path(file_okay=False))
def convert_bin(peft_dir: str) -> None:
    """Opt-in: convert a trusted pickle-only adapter_model.bin to adapter_model.safetensors.

    Uses torch.load(weights_only=True), which refuses arbitrary pickled objects.
    """
    from peft_export.exporter.runtime_adapters.convert_bin import convert_bin_to_safetensors

    out = convert_bin_to_safetensors(peft_dir)
    click.echo(f"wrote {out}")


def _mode(bundle: str) -> str:
    from peft_export.exporter.bundle_files import read_manifest

    return read_manifest(bundle).mode
