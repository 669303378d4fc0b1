"""What `--quantize` asks for, and which of the model's linear layers it applies to."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from peft_export.exporter.errors import ExportError

LEVELS = ("none", "int8", "int4")
BLOCK_SIZES = (32, 64, 128)
FORMATS = ("auto", "qdq", "matmulnbits")
"""Graph forms. qdq: standard block-wise DequantizeLinear -> MatMul, which TensorRT builds as
weight-only quantization and ONNX Runtime fuses into its MatMulNBits kernel at load, at the
accuracy level the session asks for. matmulnbits: ONNX Runtime's op written out, which alone
can hold float zero points (a GGUF Q4_1 block's minimum, exactly). auto: matmulnbits for an
ONNX Runtime-only graph (`--ort-fusions cpu`; symmetric blocks, so the fast kernel: SmolLM2
int8 loads in 0.45 s of CPU instead of 1.2 s and holds ~100 MB less memory, nothing to fuse
or transpose at load), else qdq."""
ACCURACY_EXACT = 1
"""ONNX Runtime's quantized MatMul computing in float32 on the dequantized weights."""
ACCURACY_FAST = 4
"""ONNX Runtime's quantized MatMul quantizing activations to int8 per block (CPU)."""
HEADS = ("auto", "int8", "int4", "none")
"""The output head's width (`--quant-head`): auto = a GGUF's own blocks where they map exactly
(SmolLM2's Q8_0 table, as llama.cpp and OpenVINO keep it), else --quantize's; none = full
precision. The head is read for every token, so at int4 an 8-bit head is ~30% of SmolLM2's
weight traffic per step."""
TIED_TABLES = ("separate", "shared")
"""Where a quantized tied token table's codes live (`--quant-tied-table`), in graphs that
quantize the table (ONNX Runtime-only): separate gives the table's Gather its own copy,
shared lets it read the head's MatMulNBits codes. Shared saves the copy on disk (14 MB of
SmolLM2 with a 4-bit head, 28 MB with its Q8_0 one) but costs more memory while running:
ONNX Runtime prepacks the head's codes into its own buffer at load, and the Gather keeps
the mapped original resident (peak RSS, C++ runtime: 205 vs 193 MB with a 4-bit head, 232
vs 218 MB with the 8-bit one; docs/benchmarks.md)."""
QDQ_OPSET = 21
"""Block-wise DequantizeLinear and 4-bit integer types arrived in opset 21."""


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only block quantization of the base's linear layers."""

    bits: int
    block_size: int = 32
    graph_format: str = "matmulnbits"
    skip: tuple[str, ...] = ()
    """fnmatch patterns of module paths kept at full precision (e.g. "lm_head")."""
    head: str = "auto"
    """The output head's width, one of HEADS."""
    symmetric: bool = True
    embeddings: bool = False
    """Also quantize the token table (ONNX Runtime's GatherBlockQuantized: ORT-only graphs)."""
    accuracy_level: int = ACCURACY_FAST
    """ONNX Runtime's compute for quantized MatMuls when serving; `verify` runs ACCURACY_EXACT."""
    tied_table: str = "separate"
    """One of TIED_TABLES."""
    zero_points: bool = False
    """Blocks may keep zero points (asked for with --quant-format matmulnbits): a GGUF Q4_1
    is carried exactly, on ONNX Runtime's slower kernel. Otherwise every block is symmetric
    and carried blocks that are not are quantized again."""

    @classmethod
    def parse(
        cls,
        level: str,
        *,
        block_size: int = 32,
        graph_format: str = "auto",
        skip: tuple[str, ...] = (),
        head: str = "auto",
        engine: str | None = None,
        accuracy_level: int = ACCURACY_FAST,
        ort_only: bool = False,
        tied_table: str = "separate",
    ) -> QuantScheme | None:
        """The scheme for CLI values; None for `--quantize none`. Checks every value first.

        `ort_only`: the graph is for ONNX Runtime alone (`--ort-fusions cpu`), so the token
        table may use ONNX Runtime's quantized Gather too (matmulnbits graphs always do).
        """
        if level not in LEVELS:
            raise ExportError(f"unknown --quantize {level!r}; use one of {', '.join(LEVELS)}")
        if block_size not in BLOCK_SIZES:
            raise ExportError(
                f"--quant-block {block_size} is not supported; use one of "
                f"{', '.join(map(str, BLOCK_SIZES))}"
            )
        if graph_format not in FORMATS:
            raise ExportError(f"unknown --quant-format {graph_format!r}; use {', '.join(FORMATS)}")
        if head not in HEADS:
            raise ExportError(f"unknown --quant-head {head!r}; use one of {', '.join(HEADS)}")
        if tied_table not in TIED_TABLES:
            raise ExportError(
                f"unknown --quant-tied-table {tied_table!r}; use one of {', '.join(TIED_TABLES)}"
            )
        if level == "none":
            return None
        zero_points = graph_format == "matmulnbits"
        if graph_format == "auto":
            graph_format = "matmulnbits" if ort_only and engine != "trt" else "qdq"
        if graph_format == "matmulnbits" and engine == "trt":
            raise ExportError(
                "--quant-format matmulnbits is an ONNX Runtime op that TensorRT cannot build; "
                "use --quant-format qdq (the default with --engine trt)"
            )
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"--quant-accuracy {accuracy_level} must be 0, 1, 2, 3 or 4")
        return cls(
            bits=8 if level == "int8" else 4,
            block_size=block_size,
            graph_format=graph_format,
            skip=tuple(skip),
            head=head,
            accuracy_level=accuracy_level,
            embeddings=ort_only or graph_format == "matmulnbits",
            tied_table=tied_table,
            zero_points=zero_points,
        )

    @property
    def level(self) -> str:
        return f"int{self.bits}"

    def head_bits(self) -> int | None:
        """The head's bit width when --quant-head names one (None: auto or none)."""
        return {"int8": 8, "int4": 4}.get(self.head)

    def skips(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.skip)
