"""The LoRA-bank GraphExtension: target modules read bank inputs and `adapter_ids`.

Each target module becomes, per row b with s = adapter_ids[b]:

    x' = x * in_scale[s]                                   (only when ia3 is accepted)
    y  = out_scale[s] * (W x' + MultiLoRA(x', A, B, ids)) + bias_scale[s] * bias

Scale inputs exist only for the methods that need them, so a LoRA-only graph pays one
MultiLoRA node and one Add per module at decode time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from peft_export.bundle import names
from peft_export.bundle.manifest import AdapterLayout, ModuleSlot
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.runtime_adapters import multilora_op

if TYPE_CHECKING:
    import onnx

LORA_METHODS = ("lora", "rslora", "dora", "adalora", "loha", "lokr", "ia3")
TRACE_SLOTS = 5
"""Slot count of the trace examples: distinct from the wrapper's batch/seq/past sizes."""


def bank_parts(methods: Sequence[str], has_bias: bool) -> tuple[str, ...]:
    """Which bank inputs one module has, given the methods the slots accept."""
    parts = ["A", "B"]
    if "dora" in methods or "ia3" in methods:
        parts.append("out_scale")
    if "ia3" in methods:
        parts.append("in_scale")
        if has_bias:
            parts.append("bias_scale")
    return tuple(parts)


def bank_shape(slot: ModuleSlot, part: str, r_max: int) -> tuple[int, ...]:
    """Shape of one slot of a bank (the graph input without its leading `slots` dim)."""
    return {
        "A": (r_max, slot.in_features),
        "B": (slot.out_features, r_max),
        "out_scale": (slot.out_features,),
        "in_scale": (slot.in_features,),
        "bias_scale": (slot.out_features,),
    }[part]


def slot_zero_value(part: str) -> float:
    """Slot 0 (the base model): deltas zero, scales one."""
    return 0.0 if part in ("A", "B") else 1.0


class LoraBanks(GraphExtension):
    """Bank inputs for a fixed set of target modules, r_max and accepted methods."""

    def __init__(
        self,
        modules: Sequence[ModuleSlot],
        *,
        r_max: int,
        slots: int,
        methods: Sequence[str],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        unknown = sorted(set(methods) - set(LORA_METHODS))
        if unknown:
            raise ExportError(
                f"--methods {','.join(unknown)} are not LoRA-family methods; "
                f"choose from {', '.join(LORA_METHODS)}"
            )
        if not modules:
            raise ExportError("runtime mode needs target modules; pass --target-modules")
        if r_max < 1 and any(m != "ia3" for m in methods):
            raise ExportError("--max-rank must be at least 1; pass e.g. --max-rank 16")
        if slots < 2:
            raise ExportError("--slots must be at least 2 (slot 0 is the base model)")
        self.modules = list(modules)
        self.r_max = max(r_max, 1)
        self.slots = slots
        self.methods = list(methods)
        self.dtype = dtype
        self._feeds: dict[str, torch.Tensor] = {}

    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        gen = torch.Generator().manual_seed(0)
        extra = []
        for slot in self.modules:
            for part in bank_parts(self.methods, slot.has_bias):
                shape = (TRACE_SLOTS, *bank_shape(slot, part, self.r_max))
                example = slot_zero_value(part) + 0.1 * torch.randn(shape, generator=gen)
                extra.append(
                    ExtraInput(
                        names.lora_input(slot.path, part),
                        ("slots", *shape[1:]),
                        example.to(self.dtype),
                    )
                )
        ids = torch.arange(batch, dtype=torch.int64) % TRACE_SLOTS
        extra.append(ExtraInput(names.ADAPTER_IDS, ("batch",), ids))
        return extra

    def install(self, model: nn.Module) -> None:
        for slot in self.modules:
            try:
                module = model.get_submodule(slot.path)
            except AttributeError:
                raise ExportError(
                    f"target module {slot.path} does not exist in the base model; "
                    "check --target-modules"
                ) from None
            parts = bank_parts(self.methods, slot.has_bias)
            module.forward = functools.partial(self._forward, module, slot.path, parts)

    def bind(self, feeds: dict[str, torch.Tensor]) -> None:
        self._feeds = feeds

    def onnx_translations(self) -> dict[Any, Any]:
        return dict(multilora_op.TRANSLATION_TABLE)

    def finalize_onnx(self, model: onnx.ModelProto) -> None:
        multilora_op.add_function(model)

    def describe(self, layout: AdapterLayout) -> None:
        layout.methods = list(self.methods)
        layout.slots = self.slots
        layout.r_max = self.r_max
        layout.modules = list(self.modules)

    def _forward(
        self, module: nn.Module, path: str, parts: tuple[str, ...], x: torch.Tensor
    ) -> torch.Tensor:
        feeds = self._feeds
        ids = feeds[names.ADAPTER_IDS]

        def per_row(part: str) -> torch.Tensor:
            return feeds[names.lora_input(path, part)].index_select(0, ids).unsqueeze(1)

        if "in_scale" in parts:
            x = x * per_row("in_scale")
        weight, bias = module.weight, module.bias
        delta = multilora_op.multi_lora(
            x, feeds[names.lora_input(path, "A")], feeds[names.lora_input(path, "B")], ids
        )
        scaled = "out_scale" in parts
        if _is_conv1d(module):
            y = torch.matmul(x, weight)
            if bias is not None and not scaled:
                y = y + bias
        else:
            y = F.linear(x, weight, None if scaled else bias)
        y = y + delta
        if not scaled:
            return y
        y = y * per_row("out_scale")
        if bias is None:
            return y
        if "bias_scale" in parts:
            return y + per_row("bias_scale") * bias
        return y + bias


def _is_conv1d(module: nn.Module) -> bool:
    """transformers Conv1D (GPT-2) stores its weight [in, out]."""
    return type(module).__name__ == "Conv1D"
