"""`peft-export export`: base model + PEFT adapters -> bundle (ONNX graph, manifest, tokenizer).

Runtime-mode families and engine builds plug in through the four tuples below, each entry
a "module:attribute" string resolved only when the command runs (so `--help` stays fast
and a part that is not installed cannot break the command's import):

- OPTIONS: click decorators adding options; their values reach planners and post steps as
  `ExportContext.options` (keyed by the click parameter name);
- PLANNERS: `pipeline.Planner` functions serving runtime-mode methods;
- POST_STEPS: `pipeline.PostStep` functions run on the staged bundle (e.g. engine builds);
- CHECKS: `pipeline.Check` functions run before the graph is exported (a post step's options).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click

from peft_export.bundle.manifest import MODES, PRECISIONS
from peft_export.exporter.quantize.scheme import (
    ACCURACY_FAST,
    BLOCK_SIZES,
    FORMATS,
    HEADS,
    LEVELS,
    TIED_TABLES,
    QuantScheme,
)

OPTIONS: tuple[str, ...] = (
    "peft_export.exporter.runtime_adapters.cli_options:lora_bank_options",
    "peft_export.exporter.bottleneck.cli_options:bottleneck_bank_options",
    "peft_export.exporter.runtime_adapters.cli_options:norm_bank_options",
    "peft_export.exporter.engines.build:export_engine_options",
    "peft_export.exporter.prompt_adapters.cli_options:prompt_input_options",
    "peft_export.exporter.graph.ort_fusions:ort_fusion_options",
    "peft_export.exporter.encoders.cli_options:encoder_options",
)
PLANNERS: tuple[str, ...] = (
    "peft_export.exporter.runtime_adapters.planner:plan_lora_banks",
    "peft_export.exporter.bottleneck.planner:plan_bottleneck_banks",
    "peft_export.exporter.runtime_adapters.norm_tuning:plan_norm_banks",
    "peft_export.exporter.prompt_adapters.planner:plan_prompt_inputs",
)
POST_STEPS: tuple[str, ...] = (
    "peft_export.exporter.graph.ort_fusions:ort_fusion_step",
    "peft_export.exporter.engines.build:export_engine_step",
)
CHECKS: tuple[str, ...] = ("peft_export.exporter.engines.build:export_engine_check",)


def _resolve(ref: str) -> Any:
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _with_contributed_options(command):
    for ref in reversed(OPTIONS):
        command = _resolve(ref)(command)
    return command


@click.command("export")
@click.option("--base", required=True, help="HF model folder, .gguf file or known short name.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="[NAME=]DIR",
    help="PEFT adapter folder (repeatable); NAME defaults to the folder name.",
)
@click.option("--method", default=None, help="Assert the adapters' PEFT method (e.g. lora, dora).")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="merged",
    show_default=True,
    help="merged: the adapter folded into the weights; runtime: adapters chosen per request.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="Weight and activation dtype (the Python runtime runs fp32 and fp16).",
)
@click.option(
    "--external-data",
    is_flag=True,
    default=None,
    help="Store weights in model.onnx.data (automatic above 16 MiB and for quantized graphs).",
)
@click.option(
    "--quantize",
    type=click.Choice(LEVELS),
    default="none",
    show_default=True,
    help="Store the base's linear weights block-quantized (weight-only; adapters stay float).",
)
@click.option(
    "--quant-block",
    type=click.Choice([str(b) for b in BLOCK_SIZES]),
    default="32",
    show_default=True,
    help="Weights per quantization block (along the input features).",
)
@click.option(
    "--quant-skip",
    multiple=True,
    metavar="PATTERN",
    help="Module paths kept at full precision (fnmatch, repeatable; e.g. lm_head).",
)
@click.option(
    "--quant-head",
    type=click.Choice(HEADS),
    default="auto",
    show_default=True,
    help="The output head's width (and a tied token table's): auto keeps a GGUF's own "
    "blocks where exact (e.g. SmolLM2's Q8_0 table), else --quantize's; none: full precision.",
)
@click.option(
    "--quant-tied-table",
    type=click.Choice(TIED_TABLES),
    default="separate",
    show_default=True,
    help="A quantized tied token table (ONNX Runtime graphs): its own copy (less memory "
    "while running) or shared with the head's codes (a smaller file).",
)
@click.option(
    "--quant-format",
    type=click.Choice(FORMATS),
    default="auto",
    show_default=True,
    help="Graph form: qdq (standard DequantizeLinear; ONNX Runtime and TensorRT) or "
    "matmulnbits (ONNX Runtime only; given explicitly, keeps a GGUF's Q4_1 blocks exactly, "
    "slower on CPU). auto: matmulnbits (symmetric) with --ort-fusions cpu, else qdq.",
)
@click.option(
    "--quant-accuracy",
    type=click.IntRange(0, 4),
    default=ACCURACY_FAST,
    show_default=True,
    help="ONNX Runtime's compute for quantized MatMuls when serving: 4 int8 activations "
    "(fast), 1 float32 (exact; verify always checks parity at 1).",
)
@click.option("--out", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@_with_contributed_options
def command(
    base: str,
    adapters: tuple[str, ...],
    method: str | None,
    mode: str,
    precision: str,
    external_data: bool | None,
    quantize: str,
    quant_block: str,
    quant_skip: tuple[str, ...],
    quant_head: str,
    quant_tied_table: str,
    quant_format: str,
    quant_accuracy: int,
    out: str,
    force: bool,
    **options: Any,
) -> None:
    """Export BASE with PEFT adapters into a deployable bundle."""
    from rich.console import Console

    from peft_export.exporter.adapter_source import METHODS, parse_adapter_arg, read_adapter
    from peft_export.exporter.errors import ExportError

    if method is not None and method not in METHODS:
        raise ExportError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if mode == "merged" and len(adapters) > 1:
        raise ExportError(
            f"merged mode folds one adapter into the weights, got {len(adapters)}; "
            "export one bundle per adapter or use --mode runtime"
        )
    for value in adapters:
        name, path = parse_adapter_arg(value)
        read_adapter(path, name=name, method=method)
    scheme = QuantScheme.parse(
        quantize,
        block_size=int(quant_block),
        graph_format=quant_format,
        skip=quant_skip,
        head=quant_head,
        engine=options.get("engine"),
        accuracy_level=quant_accuracy,
        ort_only=options.get("ort_fusions", "none") != "none",
        tied_table=quant_tied_table,
    )
    if scheme is not None and precision != "fp32":
        raise ExportError("--quantize keeps activations in fp32; drop --precision or use fp32")
    console = Console(stderr=True)
    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.graph.ort_fusions import graph_opset
    from peft_export.exporter.pipeline import check_out_dir, export_bundle
    from peft_export.exporter.quantize.gguf_blocks import describe_carried

    check_out_dir(Path(out), force)
    if _export_encoder(base, adapters, method, mode, precision, scheme, out, force, options):
        return
    with console.status(f"loading base model {base}"):
        loaded = load_base(base)
    with console.status("reading the GGUF's quantized blocks"):
        carried = loaded.gguf_blocks(scheme)
    if carried is not None:
        console.log(describe_carried(carried))
    manifest = export_bundle(
        loaded,
        list(adapters),
        out=out,
        method=method,
        mode=mode,
        precision=precision,
        external_data=external_data,
        force=force,
        planners=[_resolve(ref) for ref in PLANNERS],
        post_steps=[_resolve(ref) for ref in POST_STEPS],
        checks=[_resolve(ref) for ref in CHECKS],
        options=options,
        opset=graph_opset(options),
        quantize=scheme,
        carried_blocks=carried.blocks if carried is not None else None,
        console=console,
    )
    inputs = len(manifest.graph.inputs)
    click.echo(f"wrote {out} ({manifest.mode}, {manifest.precision}, {inputs} graph inputs)")


def _export_encoder(base, adapters, method, mode, precision, scheme, out, force, options) -> bool:
    """Export an encoder base (BERT family) and return True; False for any other base."""
    from rich.console import Console

    from peft_export.exporter.encoders.export import encoder_checkpoint, export_encoder
    from peft_export.exporter.errors import ExportError

    if encoder_checkpoint(base) is None:
        return False
    if scheme is not None:
        raise ExportError("--quantize is for decoder bases; drop it for this encoder")
    unsupported = [k for k in ("prefix_max_len", "prompt_max_len") if options.get(k)]
    unsupported += [k for k, off in (("engine", "onnx"),) if options.get(k, off) != off]
    if unsupported:
        flag = "--" + unsupported[0].replace("_", "-")
        raise ExportError(f"{flag} is not available for encoder bases yet; drop it")
    manifest = export_encoder(
        base,
        list(adapters),
        out=out,
        mode=mode,
        task=options.get("task"),
        method=method,
        precision=precision,
        options=options,
        force=force,
        console=Console(stderr=True),
    )
    inputs = len(manifest.graph.inputs)
    click.echo(f"wrote {out} ({manifest.mode}, {manifest.encoder.task}, {inputs} graph inputs)")
    return True
