"""PyTorch references for a quantized bundle, and the effect of quantization itself.

`verify` compares a quantized bundle with PyTorch/PEFT running the very weights the graph
holds (read back from the graph and dequantized), so parity is judged at the usual fp32
bound. What quantization costs is a separate question, answered against the unquantized
base + adapter on a fixed English text (`EVAL_TEXT`): top-1 agreement and mean KL divergence
of the next-token distributions, and greedy agreement on the verify prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peft_export.bundle.graph_file import load_graph
from peft_export.bundle.manifest import Manifest
from peft_export.bundle.paths import confined
from peft_export.exporter.quantize.apply import is_conv1d
from peft_export.exporter.quantize.blocks import BlockQuantized
from peft_export.exporter.quantize.graph import read_blocks

EVAL_TEXT = (
    "The harbour town woke slowly. Fishermen checked their nets while the bakery on the corner "
    "pulled the first loaves from the oven, and the smell of bread drifted down to the water. "
    "A ferry sounded its horn twice before leaving for the island, where most of the children "
    "went to school. In the afternoon the wind turned, clouds gathered over the hills, and the "
    "market traders packed their stalls before the rain arrived. By evening the streets were "
    "quiet again, the lamps were lit one by one, and the only sound was the sea against the "
    "harbour wall. Water boils at one hundred degrees Celsius at sea level. Paris is the capital "
    "of France, Berlin is the capital of Germany, and Madrid is the capital of Spain. To make a "
    "cup of tea, heat fresh water, pour it over the leaves, wait three to five minutes, and "
    "remove the leaves before drinking."
)


def graph_blocks(root: Path, manifest: Manifest) -> dict[str, BlockQuantized]:
    """The quantized layers stored in the bundle's graph, by module path."""
    quantization = manifest.quantization
    if quantization is None:
        return {}
    model = load_graph(confined(root, manifest.graph.file))
    return read_blocks(model, quantization)


@torch.no_grad()
def load_blocks(model: nn.Module, blocks: dict[str, BlockQuantized]) -> nn.Module:
    """Put the dequantized blocks into `model`'s layers (module paths as in the bundle)."""
    for path, block in blocks.items():
        module = model.get_submodule(path)
        weight = torch.from_numpy(block.dequantize()).to(module.weight.dtype)
        module.weight.copy_(weight.T if is_conv1d(module) else weight)
    return model


@torch.no_grad()
def quantization_effect(
    full: nn.Module,
    quantized: nn.Module,
    text_ids: Sequence[int],
    prompt_ids: Sequence[Sequence[int]],
    greedy: Callable[[nn.Module, list[int], int], tuple[list[int], Any]],
    new_tokens: int,
) -> dict[str, Any]:
    """How far the quantized model's predictions are from the unquantized model's."""
    ids = torch.tensor([list(text_ids)])
    log_p = torch.log_softmax(full(input_ids=ids, use_cache=False).logits[0].double(), -1)
    log_q = torch.log_softmax(quantized(input_ids=ids, use_cache=False).logits[0].double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    top1 = (log_p.argmax(-1) == log_q.argmax(-1)).double()
    matched = total = identical = 0
    for prompt in prompt_ids:
        want, _ = greedy(full, list(prompt), new_tokens)
        got, _ = greedy(quantized, list(prompt), new_tokens)
        same = next(
            (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), len(want)
        )
        matched += same
        total += len(want)
        identical += int(same == len(want))
    return {
        "text_tokens": len(text_ids),
        "top1_agreement": round(float(top1.mean()), 4),
        "mean_kl": float(np.float32(kl.mean())),
        "greedy_tokens_matched": round(matched / max(total, 1), 4),
        "greedy_prompts_identical": f"{identical}/{len(prompt_ids)}",
    }
