"""PyTorch reference of the peft_export::MultiLoRA op (gather + bmm).

It is the op's definition in standard ops, the same computation as the ONNX local
function body, and the baseline the kernels are tested and benchmarked against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def multilora_reference(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, adapter_ids: torch.Tensor
) -> torch.Tensor:
    """delta[b, t] = B[ids[b]] @ (A[ids[b]] @ x[b, t]), computed in x's dtype.

    x [batch, seq, in], A [slots, r, in], B [slots, out, r], adapter_ids [batch] int64;
    returns [batch, seq, out]. A negative id counts from the end, as in ONNX Gather.
    """
    import torch

    a = A[adapter_ids]  # [batch, r, in]
    b = B[adapter_ids]  # [batch, out, r]
    return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
