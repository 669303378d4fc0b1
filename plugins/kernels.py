"""The MultiLoRA CUDA kernels on torch CUDA tensors, through the C ABI and ctypes.

Used by the GPU tests and the benchmark; serving goes through the TensorRT plugin, which
calls the same C ABI.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from ._library import PluginError, load_kernels

if TYPE_CHECKING:
    import torch


class KernelPath(enum.IntEnum):
    """Kernel family (PEFT_ML_PATH_* in peft_multilora.h)."""

    AUTO = 0
    PREFILL = 1
    DECODE = 2


def workspace_size(
    batch: int, seq: int, in_features: int, out_features: int, rank: int, slots: int
) -> int:
    """Device workspace bytes a forward call of these sizes needs (any dtype or path)."""
    return int(
        load_kernels().peft_multilora_workspace_size(
            batch, seq, in_features, out_features, rank, slots
        )
    )


def _dtype_code(dtype: torch.dtype) -> int:
    import torch

    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    if dtype not in codes:
        raise ValueError(f"MultiLoRA kernels take float32, float16 or bfloat16, not {dtype}")
    return codes[dtype]


def multilora_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    adapter_ids: torch.Tensor,
    *,
    path: KernelPath = KernelPath.AUTO,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Enqueues the kernels on the current CUDA stream and returns delta [batch, seq, out].

    Inputs are made contiguous; `out` and `workspace` (uint8, at least workspace_size()
    bytes) may be passed to avoid allocations, e.g. inside CUDA graphs or timing loops.
    """
    import torch

    code = _dtype_code(x.dtype)
    if x.dim() != 3 or A.dim() != 3 or B.dim() != 3 or adapter_ids.dim() != 1:
        raise ValueError(
            "expected x [batch, seq, in], A [slots, r, in], B [slots, out, r], ids [batch]"
        )
    batch, seq, in_features = x.shape
    slots, rank, a_in = A.shape
    b_slots, out_features, b_rank = B.shape
    if (a_in, b_slots, b_rank, adapter_ids.shape[0]) != (in_features, slots, rank, batch):
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, "
            f"adapter_ids {tuple(adapter_ids.shape)}"
        )
    if A.dtype != x.dtype or B.dtype != x.dtype or adapter_ids.dtype != torch.int64:
        raise ValueError("A and B must have x's dtype and adapter_ids must be int64")
    tensors = (x, A, B, adapter_ids)
    if any(not t.is_cuda or t.device != x.device for t in tensors):
        raise ValueError("all tensors must be on the same CUDA device")
    x, A, B, adapter_ids = (t.contiguous() for t in tensors)
    if out is None:
        out = torch.empty((batch, seq, out_features), dtype=x.dtype, device=x.device)
    elif out.shape != (batch, seq, out_features) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous [batch, seq, out] tensor of x's dtype")
    needed = workspace_size(batch, seq, in_features, out_features, rank, slots)
    if workspace is None:
        workspace = torch.empty(needed, dtype=torch.uint8, device=x.device)
    elif workspace.numel() * workspace.element_size() < needed:
        raise ValueError(f"workspace holds fewer than the {needed} bytes needed")
    lib = load_kernels()
    status = lib.peft_multilora_forward_path(
        code, x.data_ptr(), A.data_ptr(), B.data_ptr(), adapter_ids.data_ptr(),
        batch, seq, in_features, out_features, rank, slots,
        out.data_ptr(), workspace.data_ptr(), needed,
        torch.cuda.current_stream(x.device).cuda_stream, int(path),
    )  # fmt: skip
    if status != 0:
        raise PluginError(f"MultiLoRA kernels: {lib.peft_multilora_status_string(status).decode()}")
    return out
