"""Quantize the PyTorch model's linear weights in place, before tracing.

Each selected layer's weight is replaced by its dequantized value, so every later step sees
what the graph will compute: the traced graph (whose float weights `graph.rewrite` then
swaps for the quantized form), DoRA's magnitude ratio against the base, the LoRA banks' base
targets, and `verify`'s PyTorch reference. The quantized blocks are returned by module path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from peft_export.exporter.errors import ExportError
from peft_export.exporter.quantize.blocks import BlockQuantized
from peft_export.exporter.quantize.rtn import quantize_rtn
from peft_export.exporter.quantize.scheme import QuantScheme


@dataclass
class QuantizedModel:
    """What `quantize_model` did: blocks by module path, and the layers it left alone."""

    scheme: QuantScheme
    blocks: dict[str, BlockQuantized] = field(default_factory=dict)
    embedding: tuple[str, BlockQuantized] | None = None
    """The token embedding's path and blocks, when the scheme quantizes it."""
    kept: dict[str, str] = field(default_factory=dict)
    """Module path -> why it stays at full precision."""

    def sources(self) -> dict[str, int]:
        """How many layers came from each source ("rtn", "gguf:Q4_0", ...)."""
        counts: dict[str, int] = {}
        for block in self.blocks.values():
            counts[block.source] = counts.get(block.source, 0) + 1
        return counts


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] (Conv1D stores [in, out])."""
    weight = module.weight.detach()
    return weight.T if is_conv1d(module) else weight


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    scheme: QuantScheme,
    *,
    carried: Mapping[str, BlockQuantized] | None = None,
    progress: Callable[[str], None] | None = None,
) -> QuantizedModel:
    """Quantize every linear layer of `model` the scheme selects; weights become dequantized.

    `carried` maps parameter names (`PATH.weight`) to blocks read from the source file (a
    GGUF's own Q4_0 / Q4_1 / Q8_0): those are kept as they are, at their own bit width, when
    the model's weight still equals them (a merged adapter changes it), their block size is
    the scheme's and the graph form can hold them; the rest are quantized here.
    """
    if model.get_input_embeddings().weight.dtype != torch.float32:
        raise ExportError("--quantize needs an fp32 model; export with --precision fp32")
    result = QuantizedModel(scheme)
    carried = carried or {}
    layers = linear_weights(model)
    head = output_head(model, layers)
    for index, (path, module) in enumerate(layers.items()):
        if progress:
            progress(f"quantizing {path} ({index + 1}/{len(layers)})")
        reason = _keep_reason(path, module, scheme, is_head=path == head)
        if reason:
            result.kept[path] = reason
            continue
        bits = (scheme.head_bits() if path == head else None) or scheme.bits
        weight = weight_matrix(module).to(torch.float32).numpy()
        block = _carried_block(carried.get(f"{path}.weight"), weight, scheme)
        if block is not None and path == head and scheme.head_bits() not in (None, block.bits):
            block = None  # --quant-head asks for another width than the GGUF's own
        if block is None:
            block = quantize_rtn(weight, bits, scheme.block_size, scheme.symmetric)
            if scheme.graph_format == "qdq" and bits == 8:
                block = block.with_positive_scales()
        dequantized = torch.from_numpy(block.dequantize())
        module.weight.copy_(dequantized.T if is_conv1d(module) else dequantized)
        result.blocks[path] = block
    if not result.blocks:
        raise ExportError(
            "--quantize selected no linear layer (all skipped or in_features not a multiple of "
            f"--quant-block {scheme.block_size}); loosen --quant-skip or use --quantize none"
        )
    if scheme.embeddings:
        _quantize_embedding(model, scheme, result)
    return result


def _quantize_embedding(model: nn.Module, scheme: QuantScheme, result: QuantizedModel) -> None:
    """Quantize the token table too: a tied table takes its lm_head's blocks (one weight).

    ONNX Runtime's GatherBlockQuantized reads only the rows a step needs; its codes have the
    implicit zero point (symmetric blocks only).
    """
    embedding = model.get_input_embeddings()
    path = next(p for p, m in model.named_modules() if m is embedding)
    tied = next((p for p, m in linear_weights(model).items() if m.weight is embedding.weight), None)
    if scheme.skips(path):
        result.kept[path] = "--quant-skip"
        return
    if tied is not None:
        block = result.blocks.get(tied)
        if block is None or not _symmetric(block):
            result.kept[path] = f"tied to {tied}, which is not quantized symmetrically"
            return
    else:
        weight = embedding.weight.detach().to(torch.float32).numpy()
        if weight.shape[1] % scheme.block_size:
            result.kept[path] = "hidden size is not a multiple of the block size"
            return
        block = quantize_rtn(weight, scheme.bits, scheme.block_size, symmetric=True)
        embedding.weight.copy_(torch.from_numpy(block.dequantize()))
    result.embedding = (path, block)


def _symmetric(block: BlockQuantized) -> bool:
    return not block.float_zero_points and bool(np.all(block.zero_points == 1 << (block.bits - 1)))


def output_head(model: nn.Module, layers: Mapping[str, nn.Module]) -> str | None:
    """The module path of the model's output head (lm_head), if it is a linear layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((path for path, module in layers.items() if module is head), None)


def _keep_reason(path: str, module: nn.Module, scheme: QuantScheme, *, is_head: bool) -> str | None:
    if scheme.skips(path):
        return "--quant-skip"
    if is_head and scheme.head == "none":
        return "--quant-head none"
    in_features = weight_matrix(module).shape[1]
    if in_features % scheme.block_size:
        return f"in_features {in_features} is not a multiple of the block size"
    return None


def _carried_block(
    block: BlockQuantized | None, weight: np.ndarray, scheme: QuantScheme
) -> BlockQuantized | None:
    if block is None or block.shape != weight.shape or block.block_size != scheme.block_size:
        return None
    if not scheme.zero_points and not _symmetric(block):
        return None  # qdq (TensorRT's form) has none; matmulnbits only when asked (slow kernel)
    if scheme.graph_format == "qdq" and block.bits == 8 and np.any(block.scales < 0):
        return None
    # Equal up to float32 rounding (a few GGUF Q4_1 blocks are an ulp off, GgufBlocks), not
    # changed by a merged adapter.
    tolerance = 4 * np.spacing(np.float32(np.abs(weight).max()))
    return block if np.abs(block.dequantize() - weight).max() <= tolerance else None


def linear_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of the model by module path: nn.Linear and transformers Conv1D."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            found[path] = module
    return found


def is_conv1d(module: nn.Module) -> bool:
    """transformers Conv1D (GPT-2) stores its weight [in, out]."""
    return type(module).__name__ == "Conv1D"
