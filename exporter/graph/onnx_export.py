"""Trace a DecoderWrapper to ONNX (dynamo exporter) and check the result.

The TorchScript exporter cannot trace transformers 5 models, so this uses
`torch.onnx.export(dynamo=True)`. Dynamic axes are traced as anonymous dynamic dims and then
renamed to the contract's dim names, so the graph and the manifest say the same thing.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import onnx
import torch
from rich.console import Console

from peft_export.bundle.manifest import GraphSpec, TensorSpec
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.moe_experts import traceable_experts
from peft_export.exporter.graph.wrapper import DecoderWrapper, GraphIO

OPSET = 18
"""Default opset: what TensorRT's and TensorRT-RTX's parsers build (opset 23's Attention,
RMSNormalization and RotaryEmbedding are not all buildable there)."""
EXTERNAL_DATA_THRESHOLD = 16 * 1024**2
"""Weights above this go to model.onnx.data: ONNX Runtime maps that file, where it parses
weights stored inside the protobuf into memory first (SmolLM2 fp32 from the C++ runtime: open
1.34 -> 0.76 s, 891 -> 693 MB resident; MiniLM: load 0.21 -> 0.13 s, peak 199 -> 127 MB).
Smaller graphs (the tests' tiny models) stay one file; protobuf caps one at 2 GB anyway."""

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


def weights_nbytes(model: torch.nn.Module) -> int:
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in unique.values())


def export_onnx(
    wrapper: DecoderWrapper,
    path: str | Path,
    *,
    external_data: bool | None = None,
    opset: int = OPSET,
    console: Console | None = None,
) -> GraphSpec:
    """Write `path` (and `path`.data when external) and return the graph's GraphSpec.

    `external_data=None` decides by size. The graph file name recorded is `path`'s name.
    """
    path = Path(path)
    console = console or Console(stderr=True, quiet=True)
    if external_data is None:
        external_data = weights_nbytes(wrapper) > EXTERNAL_DATA_THRESHOLD
    inputs = wrapper.graph_inputs()
    outputs = wrapper.graph_outputs()
    dynamic = tuple(
        {axis: torch.export.Dim.DYNAMIC for axis, d in enumerate(io.dims) if isinstance(d, str)}
        for io in inputs
    )
    translations = {k: v for ext in wrapper.extensions for k, v in ext.onnx_translations().items()}
    with (
        _status(console, "tracing the model to ONNX (dynamo)"),
        _quiet(),
        torch.no_grad(),
        traceable_experts(wrapper.model, wrapper.spec.expert_parameters),
    ):
        try:
            program = torch.onnx.export(
                wrapper,
                tuple(io.example for io in inputs),
                input_names=[io.name for io in inputs],
                output_names=[io.name for io in outputs],
                dynamic_shapes=(dynamic,),
                opset_version=opset,
                dynamo=True,
                custom_translation_table=translations or None,
                external_data=external_data,
                verbose=False,
            )
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(
                f"tracing to ONNX failed ({type(exc).__name__}: {str(exc).splitlines()[0]:.300}); "
                "the model or an adapter uses an operation the exporter cannot trace"
            ) from exc
    with _status(console, f"writing {path.name}"):
        program.save(str(path), external_data=external_data)
        model = onnx.load(str(path), load_external_data=False)
        _name_dims(model.graph.input, inputs)
        _name_dims(model.graph.output, outputs)
        for extension in wrapper.extensions:
            extension.finalize_onnx(model)
        onnx.save(model, str(path))
    with _status(console, "checking the graph (onnx.checker, shape inference)"):
        check_graph(path, "the exported graph", "report this with the model and adapter used")
    return GraphSpec(
        file=path.name,
        inputs=_specs(model.graph.input),
        outputs=_specs(model.graph.output),
    )


def check_graph(path: Path, what: str, fix: str) -> None:
    """onnx.checker's full check (shape inference included), as one ExportError line."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"{what} fails onnx.checker ({str(exc).splitlines()[0]:.300}); {fix}"
        ) from exc


def _name_dims(values, ios: list[GraphIO]) -> None:
    """Give dynamic axes the contract's names; check that fixed axes kept their sizes."""
    by_name = {v.name: v for v in values}
    for io in ios:
        value = by_name.get(io.name)
        if value is None:
            raise ExportError(f"the exported graph lacks {io.name!r}; report this as a bug")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(io.dims):
            raise ExportError(
                f"graph value {io.name!r} has rank {len(dims)}, expected {len(io.dims)}; "
                "report this as a bug"
            )
        for dim, want in zip(dims, io.dims, strict=True):
            if isinstance(want, str):
                dim.Clear()
                dim.dim_param = want
            elif dim.HasField("dim_value") and dim.dim_value != want:
                raise ExportError(
                    f"graph value {io.name!r} has a fixed size {dim.dim_value} where {want} "
                    "was expected; report this as a bug"
                )
            else:
                dim.Clear()
                dim.dim_value = want


def _specs(values) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(tensor.elem_type, onnx.TensorProto.DataType.Name(tensor.elem_type))
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]
        specs.append(TensorSpec(name=value.name, dtype=dtype.lower(), shape=shape))
    return specs


@contextlib.contextmanager
def _status(console: Console, message: str) -> Iterator[None]:
    with console.status(message):
        yield
    console.log(f"{message}: done")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The dynamo exporter is chatty (warnings, progress prints); keep the CLI output ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
