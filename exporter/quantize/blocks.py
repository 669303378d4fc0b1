"""One block-quantized linear weight, whatever produced it.

A weight W [N, K] (out x in features, the layout of `nn.Linear.weight`) is cut along K into
blocks of `block_size`; each block of each output row has a scale and an offset. Codes are
kept unpacked (one uint8 per weight) so that both graph forms (ONNX Runtime's MatMulNBits
and standard DequantizeLinear) pack them from the same values.

The dequantized value, in float32, is what ONNX Runtime's MatMulNBits computes at accuracy
levels 0 and 1 (measured on ORT 1.32): `(codes - zp) * scale` for integer zero points (one
rounding), and `codes * scale - zp * scale` for float zero points (each product rounded). A
float zero point is how a GGUF Q4_1 block's minimum is carried (see `float_zero_points`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (4, 8)


@dataclass(frozen=True)
class BlockQuantized:
    """W [N, K] as codes [N, K] (uint8, 0 .. 2**bits - 1), scales and zero points [N, K/block].

    `zero_points` is uint8 (an integer offset, e.g. 8 for symmetric int4) or float32 (an
    arbitrary offset, used for GGUF Q4_1's minimums). `source` says where the values came
    from, for the manifest: "rtn" (ONNX Runtime's round-to-nearest quantizer, here) or
    "gguf:Q4_0" and the like (carried from a GGUF file).
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    source: str = "rtn"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        n, k = self.codes.shape
        if self.codes.dtype != np.uint8 or k % self.block_size:
            raise ValueError(f"codes must be uint8 [N, K] with K a multiple of {self.block_size}")
        blocks = (n, k // self.block_size)
        if self.scales.shape != blocks or self.zero_points.shape != blocks:
            raise ValueError(f"scales and zero points must be {blocks}")
        if self.scales.dtype != np.float32:
            raise ValueError("scales must be float32")
        if self.zero_points.dtype not in (np.uint8, np.float32):
            raise ValueError("zero points must be uint8 or float32")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    @property
    def float_zero_points(self) -> bool:
        return self.zero_points.dtype == np.float32

    def dequantize(self) -> np.ndarray:
        """W [N, K] float32, as the graph computes it (see the module docstring)."""
        scale = np.repeat(self.scales, self.block_size, axis=1)
        zero = np.repeat(self.zero_points.astype(np.float32), self.block_size, axis=1)
        codes = self.codes.astype(np.float32)
        if self.float_zero_points:
            return codes * scale - zero * scale
        return (codes - zero) * scale

    def rows(self, start: int, stop: int) -> BlockQuantized:
        """Output rows [start, stop): one layer of blocks packed for several (pack.py)."""
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) are outside the {self.shape[0]} rows")
        return BlockQuantized(
            np.ascontiguousarray(self.codes[start:stop]),
            np.ascontiguousarray(self.scales[start:stop]),
            np.ascontiguousarray(self.zero_points[start:stop]),
            self.bits,
            self.block_size,
            self.source,
        )

    def with_positive_scales(self) -> BlockQuantized:
        """The same blocks with every scale >= 0 (TensorRT refuses negative int8 scales).

        Symmetric blocks only: a block with a negative scale has its codes mirrored around
        the zero point; the one code that has no mirror (the most negative) is clipped by one
        step, so the weights may move by at most one scale step in such blocks.
        """
        half = 1 << (self.bits - 1)
        if self.float_zero_points or not np.all(self.zero_points == half):
            raise ValueError("positive scales need symmetric blocks")
        flip = np.repeat(self.scales < 0, self.block_size, axis=1)
        signed = self.codes.astype(np.int16) - half
        mirrored = np.clip(np.where(flip, -signed, signed), -half, half - 1) + half
        return BlockQuantized(
            mirrored.astype(np.uint8),
            np.abs(self.scales),
            self.zero_points,
            self.bits,
            self.block_size,
            self.source,
        )
