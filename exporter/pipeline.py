"""The single export entry point, used by the CLI and by tests.

`export_bundle` validates every input first (base architecture, adapter folders, options),
then builds the graph and writes the bundle into a staging folder that becomes `out` only
when everything succeeded. Runtime mode and engine builds are contributed by other parts
through three hooks, so this file knows no runtime-adapter method and no TensorRT:

- a *planner* (`Planner`) looks at the context and returns a `RuntimePlan` for the adapter
  methods it serves: graph extensions plus a writer for its files under `adapters/`;
- a *post step* (`PostStep`) runs on the staged bundle after the graph and manifest exist
  (e.g. building TensorRT engines) and may update the manifest it is given;
- a *check* (`Check`) sees the context and the adapter layout the plans will record before
  the graph is exported, so a post step's options fail before the slow steps, not after.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from torch import nn

from peft_export.bundle import names
from peft_export.bundle.atomic import staged_dir
from peft_export.bundle.errors import BundleError
from peft_export.bundle.manifest import MODES, PRECISIONS, AdapterLayout, Manifest
from peft_export.bundle.methods import get_method
from peft_export.exporter import bundle_writer
from peft_export.exporter.adapter_source import (
    METHODS,
    AdapterSource,
    parse_adapter_arg,
    read_adapter,
)
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import GraphExtension
from peft_export.exporter.graph.onnx_export import OPSET, export_onnx
from peft_export.exporter.graph.wrapper import DecoderWrapper
from peft_export.exporter.merge import merge_adapter, merge_peft_model
from peft_export.exporter.quantize.apply import QuantizedModel, quantize_model
from peft_export.exporter.quantize.blocks import BlockQuantized
from peft_export.exporter.quantize.graph import quantize_graph_file
from peft_export.exporter.quantize.scheme import QDQ_OPSET, QuantScheme
from peft_export.models.architectures import ArchSpec, get_arch


class BaseLike(Protocol):
    """What export needs of a base: LoadedBase (exporter.base_model) or InMemoryBase."""

    model: nn.Module
    tokenizer_dir: Path | None
    source: str


@dataclass
class InMemoryBase:
    """A base built in code (tests, notebooks): the model and, optionally, tokenizer files."""

    model: nn.Module
    tokenizer_dir: Path | None = None
    source: str = "in-memory"


@dataclass
class ExportContext:
    """What planners and post steps see. `model` is the base as traced (already in dtype)."""

    model: nn.Module
    arch: ArchSpec
    sources: list[AdapterSource]
    mode: str
    precision: str
    dtype: torch.dtype
    base_weights_sha256: str
    options: dict[str, Any] = field(default_factory=dict)
    """Options other parts add to the export command (e.g. r_max, slots, engine profiles)."""
    quantized: QuantizedModel | None = None
    """The base's quantized layers (`--quantize`); their weights in `model` are dequantized."""
    console: Console = field(default_factory=lambda: Console(stderr=True, quiet=True))


@dataclass
class RuntimePlan:
    """One runtime-mode family's contribution: the methods it serves and how."""

    methods: tuple[str, ...]
    extensions: list[GraphExtension]
    write_adapters: Callable[[Path, AdapterLayout], None] | None = None
    """Writes adapters/NAME.safetensors into the staging folder, records them in layout."""


Planner = Callable[[ExportContext], "RuntimePlan | None"]
PostStep = Callable[[Path, Manifest, ExportContext], None]
Check = Callable[[ExportContext, AdapterLayout], None]


def export_bundle(
    base: BaseLike,
    adapters: Sequence[tuple[str | None, str | Path] | str] = (),
    *,
    out: str | Path,
    method: str | None = None,
    mode: str = "merged",
    precision: str = "fp32",
    external_data: bool | None = None,
    force: bool = False,
    planners: Sequence[Planner] = (),
    post_steps: Sequence[PostStep] = (),
    checks: Sequence[Check] = (),
    options: dict[str, Any] | None = None,
    opset: int = OPSET,
    quantize: QuantScheme | None = None,
    carried_blocks: dict[str, BlockQuantized] | None = None,
    console: Console | None = None,
) -> Manifest:
    """Export `base` with `adapters` ((name, dir) pairs or "NAME=DIR") into the bundle `out`.

    merged: zero or one adapter, folded into the weights. runtime: every adapter is served
    by a plan from `planners`. The base model object is not modified. `quantize` stores the
    base's linear weights block-quantized (merged: after merging); `carried_blocks` are the
    source file's own blocks by parameter name (a GGUF's), used where they fit the scheme.
    """
    console = console or Console(stderr=True, quiet=True)
    if mode not in MODES:
        raise ExportError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if method is not None and method not in METHODS:
        raise ExportError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    check_out_dir(Path(out), force)
    spec = get_arch(base.model.config.model_type)
    pairs = [parse_adapter_arg(a) if isinstance(a, str) else a for a in adapters]
    sources = [
        read_adapter(path, name=name, method=method, base=base.model) for name, path in pairs
    ]
    _check_unique_names(sources)
    if mode == "merged" and len(sources) > 1:
        raise ExportError(
            f"merged mode folds one adapter into the weights, got {len(sources)}; "
            "export one bundle per adapter or use --mode runtime"
        )
    with console.status("hashing the base weights"):
        base_sha = bundle_writer.weights_sha256(base.model)
    model = copy.deepcopy(base.model).eval()
    layout = AdapterLayout()
    if mode == "merged" and sources:
        with console.status(f"merging adapter {sources[0].name} ({sources[0].method})"):
            model = merge_adapter(model, sources[0])
        layout.merged = {
            "name": sources[0].name,
            "method": sources[0].method,
            "source": str(sources[0].path),
        }
    dtype = bundle_writer.PRECISION_DTYPES[precision]
    model = model.to(dtype)
    quantized = None
    if quantize is not None:
        if precision != "fp32":
            raise ExportError("--quantize keeps activations in fp32; drop --precision or use fp32")
        with console.status(f"quantizing the base's linear layers to {quantize.level}") as status:
            quantized = quantize_model(
                model, quantize, carried=carried_blocks, progress=status.update
            )
        console.log(f"quantized {len(quantized.blocks)} layers: {quantized.sources()}")
        if quantize.graph_format == "qdq":
            opset = max(opset, QDQ_OPSET)
    context = ExportContext(
        model=model,
        arch=spec,
        sources=sources,
        mode=mode,
        precision=precision,
        dtype=dtype,
        base_weights_sha256=base_sha,
        options=dict(options or {}),
        quantized=quantized,
        console=console,
    )
    plans = _runtime_plans(context, planners) if mode == "runtime" else []
    extensions = [e for plan in plans for e in plan.extensions]
    planned = copy.deepcopy(layout)
    for extension in extensions:
        extension.describe(planned)
    for check in checks:
        check(context, planned)
    return export_model(
        model,
        out,
        extensions=extensions,
        writers=[plan.write_adapters for plan in plans if plan.write_adapters],
        precision=precision,
        external_data=external_data,
        tokenizer_dir=base.tokenizer_dir,
        source=base.source,
        mode=mode,
        layout=layout,
        base_weights_sha256=base_sha,
        force=force,
        post_steps=[
            lambda stage, manifest, step=step: step(stage, manifest, context) for step in post_steps
        ],
        opset=opset,
        quantized=quantized,
        console=console,
    )


def export_model(
    model: nn.Module,
    out: str | Path,
    *,
    extensions: Sequence[GraphExtension] = (),
    writers: Sequence[Callable[[Path, AdapterLayout], None]] = (),
    precision: str | None = None,
    external_data: bool | None = None,
    tokenizer_dir: str | Path | None = None,
    source: str = "in-memory",
    mode: str = "merged",
    layout: AdapterLayout | None = None,
    base_weights_sha256: str | None = None,
    force: bool = False,
    post_steps: Sequence[Callable[[Path, Manifest], None]] = (),
    opset: int = OPSET,
    quantized: QuantizedModel | None = None,
    console: Console | None = None,
) -> Manifest:
    """Write a bundle for an in-memory HF causal LM (plain, merged, or a LoRA-family PeftModel).

    A LoRA-family PeftModel is merged, and a model of another precision converted, on a copy;
    `extensions` patch the model they are given. `precision` None keeps the model's dtype.
    Used by `export_bundle`, and directly by tests.
    """
    console = console or Console(stderr=True, quiet=True)
    check_out_dir(Path(out), force)
    if hasattr(model, "peft_config"):
        model = merge_peft_model(copy.deepcopy(model))
    precision = precision or _precision_of(model)
    dtype = bundle_writer.PRECISION_DTYPES[precision]
    if _precision_of(model) != precision:
        model = copy.deepcopy(model).to(dtype)
    model.eval()
    spec = get_arch(model.config.model_type)
    layout = layout or AdapterLayout()
    base_sha = base_weights_sha256 or bundle_writer.weights_sha256(model)
    wrapper = DecoderWrapper(model, extensions)
    try:
        with staged_dir(out, overwrite=force) as stage:
            graph = export_onnx(
                wrapper,
                stage / names.GRAPH,
                external_data=external_data,
                opset=opset,
                console=console,
            )
            quantization = None
            if quantized is not None:
                with console.status("writing the quantized weights into the graph"):
                    quantization = quantize_graph_file(stage / names.GRAPH, quantized)
            for extension in extensions:
                extension.describe(layout)
            for write in writers:
                write(stage, layout)
            bundle_writer.copy_tokenizer(tokenizer_dir, stage)
            manifest = bundle_writer.build_manifest(
                model=model,
                spec=spec,
                source=source,
                base_sha256=base_sha,
                mode=mode,
                precision=precision,
                opset=opset,
                graph=graph,
                adapters=layout,
                tokenizer=bundle_writer.tokenizer_info(stage, model),
            )
            manifest.quantization = quantization
            bundle_writer.write_manifest(stage, manifest)
            for step in post_steps:
                step(stage, manifest)
                bundle_writer.write_manifest(stage, manifest)
    except BundleError as exc:
        raise ExportError(str(exc)) from None
    console.log(f"bundle written to {out}")
    return manifest


def _runtime_plans(context: ExportContext, planners: Sequence[Planner]) -> list[RuntimePlan]:
    plans = [plan for planner in planners if (plan := planner(context)) is not None]
    served = {m for plan in plans for m in plan.methods}
    for source in context.sources:
        if source.method not in served:
            method = get_method(source.method)
            if method is not None and method.runtime is None:
                raise ExportError(
                    f"adapter {source.name} is {method.label}: runtime mode refuses it: "
                    f"{method.runtime_refusal}"
                )
            hint = "; --mode merged folds it into the weights" if method and method.merged else ""
            raise ExportError(
                f"runtime mode has no support for {source.method} (adapter {source.name}) in "
                f"this installation{hint}"
            )
    if not plans:
        raise ExportError(
            "runtime mode needs at least one adapter or runtime option to build inputs for; "
            "pass --adapter, or use --mode merged for a plain export"
        )
    return plans


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing --out early, before minutes of loading and tracing."""
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; choose another --out or pass --force")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out")


def _check_unique_names(sources: list[AdapterSource]) -> None:
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise ExportError(
                f"two adapters are named {source.name!r}; name them apart with NAME=DIR"
            )
        seen.add(source.name)


def _precision_of(model: nn.Module) -> str:
    dtype = model.get_input_embeddings().weight.dtype
    for precision, candidate in bundle_writer.PRECISION_DTYPES.items():
        if candidate == dtype:
            return precision
    raise ExportError(f"model dtype {dtype} is not exportable; convert it to float32 or float16")
