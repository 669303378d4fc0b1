"""Round-to-nearest block quantization by ONNX Runtime's own quantizer.

The codes, scales and zero points come from the C++ routines behind onnxruntime's
`MatMulNBitsQuantizer` (`quantize_matmul_4bits` / `_8bits`), so a bundle quantizes a weight
exactly as ONNX Runtime's tooling would; this module only unpacks their output into
`BlockQuantized`.
"""

from __future__ import annotations

import numpy as np

from peft_export.exporter.quantize.blocks import BlockQuantized


def quantize_rtn(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockQuantized:
    """Quantize W [N, K] (float32, nn.Linear layout) in blocks of `block_size` along K."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = weight.shape
    blocks = k // block_size
    packed = np.zeros((n, blocks, block_size * bits // 8), dtype=np.uint8)
    packed_zero = np.zeros((n, (blocks * bits + 7) // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    column_major = np.ascontiguousarray(weight.T, dtype=np.float32)  # [K, N], as MatMul's B
    quantize(packed, column_major, scales, packed_zero, block_size, n, k, symmetric)
    codes = unpack_codes(packed.reshape(n, -1), bits, k)
    if symmetric:
        zero = np.full((n, blocks), 1 << (bits - 1), dtype=np.uint8)
    else:
        zero = unpack_codes(packed_zero, bits, blocks)
    return BlockQuantized(codes, scales, zero, bits, block_size, source="rtn")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Rows of packed bytes (two 4-bit values a byte, low nibble first) -> uint8 [rows, count]."""
    if bits == 8:
        return np.ascontiguousarray(packed[:, :count])
    low, high = packed & 0x0F, packed >> 4
    return np.ascontiguousarray(
        np.stack([low, high], axis=-1).reshape(packed.shape[0], -1)[:, :count]
    )


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, count] -> rows of packed bytes (the inverse of `unpack_codes`)."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4), dtype=np.uint8)
