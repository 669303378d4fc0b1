"""The LoRA-bank GraphExtension: target modules read bank inputs and `adapter_ids`.

Each target module becomes, per row b with s = adapter_ids[b]:

    x' = x * in_scale[s]                                   (modules with an in_scale input)
    y  = out_scale[s] * (W x' + gate * MultiLoRA(x', A, B, ids)) + bias_scale[s] * bias

`gate` is 1 unless the graph serves activated LoRA (`alora_start`, exporter/runtime_adapters/
alora.py): then it is 0 at the positions before the row's activation.

A LoRA-only graph pays one MultiLoRA node and one Add per module at decode time; each scale
is one SlotScale node more (exporter/runtime_adapters/slot_scale_op.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from peft_export.bundle import names
from peft_export.bundle.manifest import AdapterLayout, ModuleSlot
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.runtime_adapters import alora, multilora_op, slot_scale_op

if TYPE_CHECKING:
    import onnx

TRACE_SLOTS = 5
"""Slot count of the trace examples: distinct from the wrapper's batch/seq/past sizes."""


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
    """Bank inputs for a fixed set of target modules, r_max and accepted methods; `parts`
    maps each module's path to its bank inputs (bundle_adapters.plan_layout)."""

    def __init__(
        self,
        modules: Sequence[ModuleSlot],
        *,
        r_max: int,
        slots: int,
        methods: Sequence[str],
        parts: Mapping[str, tuple[str, ...]],
        dtype: torch.dtype = torch.float32,
        activated: bool = False,
    ) -> None:
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
        self.parts = dict(parts)
        self.dtype = dtype
        self.activated = activated
        self._feeds: dict[str, torch.Tensor] = {}
        self._gate: torch.Tensor | None = None

    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        gen = torch.Generator().manual_seed(0)
        extra = []
        for slot in self.modules:
            for part in self.parts[slot.path]:
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
        if self.activated:
            extra.append(alora.start_input(batch, seq))
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
            parts = self.parts[slot.path]
            module.forward = functools.partial(self._forward, module, slot.path, parts)

    def bind(self, feeds: dict[str, torch.Tensor]) -> None:
        self._feeds = feeds
        self._gate = alora.gate(feeds) if self.activated else None

    def onnx_translations(self) -> dict[Any, Any]:
        return {**multilora_op.TRANSLATION_TABLE, **slot_scale_op.TRANSLATION_TABLE}

    def finalize_onnx(self, model: onnx.ModelProto) -> None:
        multilora_op.add_function(model)
        slot_scale_op.add_function(model)

    def describe(self, layout: AdapterLayout) -> None:
        layout.methods = list(self.methods)
        layout.slots = self.slots
        layout.r_max = self.r_max
        layout.modules = list(self.modules)
        layout.alora = self.activated

    def _forward(
        self, module: nn.Module, path: str, parts: tuple[str, ...], x: torch.Tensor
    ) -> torch.Tensor:
        ids = self._feeds[names.ADAPTER_IDS]
        if x.dim() == 2:
            # Some blocks flatten [batch, seq, in] to [tokens, in] first (Qwen2-MoE's shared
            # expert); the row's adapter needs the batch dim back, and the caller its shape.
            rows = x.reshape(ids.shape[0], -1, x.shape[-1])
            y = self._forward(module, path, parts, rows)
            return y.reshape(-1, y.shape[-1])
        feeds = self._feeds

        def bank(part: str) -> torch.Tensor:
            return feeds[names.lora_input(path, part)]

        if "in_scale" in parts:
            x = slot_scale_op.slot_scale(x, bank("in_scale"), ids)
        weight, bias = module.weight, module.bias
        delta = multilora_op.multi_lora(
            x, feeds[names.lora_input(path, "A")], feeds[names.lora_input(path, "B")], ids
        )
        if self._gate is not None:
            delta = delta * self._gate.to(delta.dtype)
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
        y = slot_scale_op.slot_scale(y, bank("out_scale"), ids)
        if bias is None:
            return y
        if "bias_scale" in parts:
            return y + bank("bias_scale").index_select(0, ids).unsqueeze(1) * bias
        return y + bias


def _is_conv1d(module: nn.Module) -> bool:
    """transformers Conv1D (GPT-2) stores its weight [in, out]."""
    return type(module).__name__ == "Conv1D"
