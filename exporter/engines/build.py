"""`--engine trt` and `build-engine`: options, the cache, and the manifest record.

Export and build-engine share `add_engine_options` (the click options) and `build_engines`
(build every engine the options ask for into a bundle folder and record it). The folder may
be an export's staging folder or an existing bundle; files are written atomically.

`export --engine trt` checks every engine option before any work: what needs no model when
the command starts (`check_engine_options`), the profiles against the model's positions and
the planned adapter layout before the graph is exported (`export_engine_check`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from peft_export.bundle import names
from peft_export.bundle.atomic import staged_file, write_text
from peft_export.bundle.manifest import AdapterLayout, EngineRecord, Manifest
from peft_export.bundle.paths import confined
from peft_export.exporter.engines import refit
from peft_export.exporter.engines.builder import BuildPlan, build_engine_bytes
from peft_export.exporter.engines.cache import EngineCache, cache_key, onnx_sha256
from peft_export.exporter.engines.gpu import gpu_compute_capability
from peft_export.exporter.engines.profiles import (
    DimRange,
    ProfileRequest,
    derive_profiles,
    plan_profiles,
)
from peft_export.exporter.engines.trt_backend import BACKEND_CHOICES, TrtBackend, select_backend
from peft_export.exporter.errors import ExportError

LORA_IMPLS = ("onnx", "plugin")


@dataclass(frozen=True)
class EngineOptions:
    trt_backend: str | None = None
    batch: str = "1:1:8"
    seq: str | None = None
    past: str | None = None
    slots: int | None = None
    compute_capability: tuple[str, ...] = ()
    refit: bool = False
    lora_impl: str = "onnx"
    engine_cache: bool = True
    progress: bool = True


_OPTION_NAMES = [f.name for f in dataclasses.fields(EngineOptions) if f.name != "progress"]


def add_engine_options(command: Any, *, slots: bool = True) -> Any:
    """Attach the engine build options to a click command or a function about to become one.

    `slots=False` leaves --slots to a command that already has it (export's LoRA banks).
    """
    options = [
        click.option(
            "--trt-backend",
            type=click.Choice(BACKEND_CHOICES),
            default=None,
            help="TensorRT flavour (default: tensorrt when installed, else tensorrt-rtx).",
        ),
        click.option("--batch", default="1:1:8", show_default=True, help="Batch min:opt:max."),
        click.option(
            "--seq",
            default=None,
            help="Prefill tokens min:opt:max (default 1:128:512, or a third of the model's "
            "positions when it has fewer than 1536).",
        ),
        click.option(
            "--past",
            default=None,
            help="Cached tokens min:opt:max (default 0:256:1024, or the positions --seq "
            "leaves when the model has fewer).",
        ),
        click.option(
            "--compute-capability",
            multiple=True,
            help="TensorRT-RTX target GPU, e.g. 8.6 (repeatable; default 8.6).",
        ),
        click.option("--refit", is_flag=True, help="Build refittable (merged adapters swap)."),
        click.option(
            "--lora-impl",
            type=click.Choice(LORA_IMPLS),
            default="onnx",
            show_default=True,
            help="Multi-LoRA as the TensorRT plugin or the standard-op function body.",
        ),
        click.option(
            "--engine-cache/--no-engine-cache",
            default=True,
            show_default=True,
            help="Reuse engines from $PEFT_EXPORT_CACHE/engines (~/.cache/peft-export).",
        ),
    ]
    if slots:
        options.append(
            click.option("--slots", type=int, default=None, help="Adapter bank slots (runtime).")
        )
    ordered = options if isinstance(command, click.Command) else reversed(options)
    for option in ordered:
        command = option(command)
    return command


def export_engine_options(command: Any) -> Any:
    """`export`'s --engine switch plus the build options (export.py OPTIONS entry); with
    --engine trt they are checked when the command starts, before the base model loads."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("engine") == "trt":
            check_engine_options(engine_options(dict(kwargs)), mode=kwargs.get("mode"))
        return command(*args, **kwargs)

    return click.option(
        "--engine",
        type=click.Choice(["onnx", "trt"]),
        default="onnx",
        show_default=True,
        help="Also build a TensorRT engine into the bundle (trt).",
    )(add_engine_options(checked, slots=False))


def export_engine_check(context: Any, layout: AdapterLayout) -> None:
    """Pipeline check (export.py CHECKS entry): with --engine trt, every engine option against
    the model and the planned adapter layout, before the graph is exported (so that a range
    beyond the model's positions does not fail after minutes of tracing)."""
    params = dict(context.options)
    if params.get("engine", "onnx") != "trt":
        return
    options = engine_options(params)
    check_engine_options(options, mode=context.mode)
    positions = context.arch.max_positions(context.model.config)
    plan_profiles(layout, _request(options), positions=positions, banks=bool(layout.modules))
    _lora_plugin(context.mode, layout, options)


def check_engine_options(options: EngineOptions, *, mode: str | None) -> None:
    """What can be checked without the model or its graph: range syntax, the TensorRT flavour
    and its targets, and the options that need the other bundle mode."""
    plan_profiles(AdapterLayout(), _request(options), positions=None, banks=False)
    _build_target(options)
    if options.refit and mode == "runtime":
        raise ExportError(_REFIT_MERGED_ONLY)
    if options.lora_impl == "plugin" and mode == "merged":
        raise ExportError(_PLUGIN_BANKS_ONLY)


def export_engine_step(stage: Path, manifest: Manifest, context: Any) -> None:
    """Pipeline post step (export.py POST_STEPS entry): build when --engine trt was given."""
    params = dict(context.options)
    if params.get("engine", "onnx") != "trt":
        return
    build_engines(stage, manifest, engine_options(params))


def engine_options(params: dict[str, Any]) -> EngineOptions:
    """Take the engine options out of a command's keyword arguments."""
    values = {name: params.pop(name) for name in _OPTION_NAMES if name in params}
    if "compute_capability" in values:
        values["compute_capability"] = tuple(values["compute_capability"])
    return EngineOptions(**values)


def build_engines(bundle_dir: Path, manifest: Manifest, options: EngineOptions) -> EngineRecord:
    """Build (or fetch from the cache) the engine; record it in manifest.json atomically."""
    bundle_dir = Path(bundle_dir)
    if manifest.graph.ort_fusions:
        raise ExportError(
            f"the bundle's graph was fused for ONNX Runtime (--ort-fusions "
            f"{manifest.graph.ort_fusions}), which TensorRT cannot build; re-export it without "
            "--ort-fusions"
        )
    backend, targets, built_for = _build_target(options)
    onnx_path = confined(bundle_dir, manifest.graph.file)
    plan = BuildPlan(
        graph=manifest.graph,
        profiles=derive_profiles(manifest, _request(options)),
        compute_capabilities=targets,
        refit_weights=_refit_weights(manifest, onnx_path, options),
        lora_plugin=_lora_plugin(manifest.mode, manifest.adapters, options),
    )
    graph_hash = onnx_sha256(onnx_path)
    key = cache_key(
        onnx=graph_hash,
        profiles=plan.profiles,
        precision=manifest.precision,
        backend=backend.name,
        version=backend.version,
        targets=built_for,
        refit=plan.refit_weights,
        lora_plugin=plan.lora_plugin,
    )
    file = f"{names.ENGINES_DIR}/{engine_stem(backend, built_for, manifest.precision, plan)}.plan"
    target = confined(bundle_dir, file)
    cache = EngineCache() if options.engine_cache else None
    if cache is None or not cache.copy_to(key, target):
        engine = build_engine_bytes(
            backend, onnx_path, plan, title=f"building {file}", progress=options.progress
        )
        if cache is not None:
            cache.store(key, engine)
        _write_bytes(target, engine)
    record = EngineRecord(
        file=file,
        backend=backend.name,
        version=backend.version,
        precision=manifest.precision,
        profiles=plan.profiles,
        compute_capability=built_for,
        refittable=bool(plan.refit_weights),
        lora_impl="plugin" if plan.lora_plugin else "onnx",
        onnx_sha256=graph_hash,
    )
    manifest.engines = [e for e in manifest.engines if e.file != file] + [record]
    write_text(bundle_dir / names.MANIFEST, manifest.to_json())
    return record


def engine_stem(backend: TrtBackend, built_for: str | None, precision: str, plan: BuildPlan) -> str:
    targets = "-".join("sm" + cc.replace(".", "") for cc in (built_for or "").split(",") if cc)
    flavour = "rtx_" if backend.is_rtx else ""
    suffix = ("_refit" if plan.refit_weights else "") + ("_plugin" if plan.lora_plugin else "")
    return f"model_{flavour}{targets}_{precision}{suffix}"


def _build_target(options: EngineOptions) -> tuple[TrtBackend, list[str], str | None]:
    """The TensorRT flavour, its compute-capability targets and what the engine is built for."""
    backend = select_backend(options.trt_backend)
    targets = backend.compute_capabilities(list(options.compute_capability))
    built_for = ",".join(targets) if backend.is_rtx else gpu_compute_capability()
    if not backend.is_rtx and built_for is None:
        raise ExportError(
            "full TensorRT builds for the GPU it runs on and none is visible; build on the "
            "target machine or use --trt-backend tensorrt-rtx (ahead of time, no GPU needed)"
        )
    return backend, targets, built_for


def _request(options: EngineOptions) -> ProfileRequest:
    return ProfileRequest(
        batch=DimRange.parse(options.batch, "--batch"),
        seq=None if options.seq is None else DimRange.parse(options.seq, "--seq"),
        past=None if options.past is None else DimRange.parse(options.past, "--past"),
        slots=options.slots,
    )


_REFIT_MERGED_ONLY = (
    "--refit applies to merged bundles; a runtime-mode engine swaps adapters through "
    "its bank inputs without refitting: drop --refit"
)
_PLUGIN_BANKS_ONLY = (
    "--lora-impl plugin applies to runtime-mode bundles with LoRA banks; this bundle "
    "has none: drop the option"
)


def _refit_weights(manifest: Manifest, onnx_path: Path, options: EngineOptions) -> list[str]:
    if not options.refit:
        return []
    if manifest.mode != "merged":
        raise ExportError(_REFIT_MERGED_ONLY)
    weights = refit.refittable_initializers(refit.refit_targets(onnx_path))
    if not weights:
        raise ExportError(
            f"{onnx_path.name} carries no projection weights the refit mapping recognizes "
            "(no torch name scopes in the graph); re-export the bundle with this peft-export"
        )
    return weights


def _lora_plugin(mode: str, layout: AdapterLayout, options: EngineOptions) -> bool:
    if options.lora_impl != "plugin":
        return False
    if mode != "runtime" or not layout.modules:
        raise ExportError(_PLUGIN_BANKS_ONLY)
    return True


def _write_bytes(target: Path, data: bytes) -> None:
    with staged_file(target) as tmp:
        tmp.write_bytes(data)
