"""The norm-bank GraphExtension: LN-tuning rows compute their norms with their own parameters.

Per row b with s = adapter_ids[b], each banked norm computes

    y[b] = norm(x[b]; weight + norm.PATH.weight[s], bias + norm.PATH.bias[s])

(bundle/norm_banks.py: banks hold the adapter's parameters minus the base's, slot 0 zeros).
A LayerNorm normalises without its affine part and applies the per-row weight and bias; any
other norm (RMSNorm, Gemma's 1 + weight form, q/k norms over heads) runs its own forward with
the per-row parameters broadcast over the row's positions (torch.func.functional_call), so the
family's own formula is kept without a per-family branch. Each norm module is replaced in its
parent by a `RowNorm` holding it, so hooks other extensions put on the norm still fire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from peft_export.bundle import names
from peft_export.bundle import norm_banks as nb
from peft_export.bundle.manifest import AdapterLayout
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.runtime_adapters.banks import TRACE_SLOTS


@dataclass(frozen=True)
class NormSlot:
    """One banked norm layer: its path, feature count and the parameters it has."""

    path: str
    features: int
    parts: tuple[str, ...]


class RowNorm(nn.Module):
    """A norm layer whose parameters are chosen per batch row (see the module docstring)."""

    def __init__(self, norm: nn.Module, slot: NormSlot, banks: NormBanks) -> None:
        super().__init__()
        self.norm = norm
        self.slot = slot
        self._banks = (banks,)  # a tuple: the extension is no submodule

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        feeds = self._banks[0].feeds
        ids = feeds[names.ADAPTER_IDS]
        shape = (ids.shape[0],) + (1,) * (x.dim() - 2) + (self.slot.features,)
        rows = {}
        for part in self.slot.parts:
            bank = feeds[nb.bank_input(self.slot.path, part)]
            base = getattr(self.norm, part)
            rows[part] = (base + bank.index_select(0, ids).to(base.dtype)).reshape(shape)
        if isinstance(self.norm, nn.LayerNorm):
            y = F.layer_norm(x, self.norm.normalized_shape, None, None, self.norm.eps)
            y = y * rows["weight"]
            return y + rows["bias"] if "bias" in rows else y
        return torch.func.functional_call(self.norm, rows, (x, *args), kwargs)


class NormBanks(GraphExtension):
    """Bank inputs for the norms of `norms`; slot 0 (zeros) is the base model."""

    def __init__(
        self, norms: Sequence[NormSlot], *, slots: int, dtype: torch.dtype = torch.float32
    ) -> None:
        if slots < 2:
            raise ExportError("--slots must be at least 2 (slot 0 is the base model)")
        self.norms = list(norms)
        self.slots = slots
        self.dtype = dtype
        self.feeds: dict[str, torch.Tensor] = {}

    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        gen = torch.Generator().manual_seed(4)
        extra = []
        for slot in self.norms:
            for part in slot.parts:
                example = 0.1 * torch.randn((TRACE_SLOTS, slot.features), generator=gen)
                name = nb.bank_input(slot.path, part)
                extra.append(ExtraInput(name, ("slots", slot.features), example.to(self.dtype)))
        ids = torch.arange(batch, dtype=torch.int64) % TRACE_SLOTS
        extra.append(ExtraInput(names.ADAPTER_IDS, ("batch",), ids))
        return extra

    def install(self, model: nn.Module) -> None:
        for slot in self.norms:
            try:
                norm = model.get_submodule(slot.path)
            except AttributeError:
                raise ExportError(
                    f"norm layer {slot.path} does not exist in the base model; check --norm-targets"
                ) from None
            model.set_submodule(slot.path, RowNorm(norm, slot, self))

    def bind(self, feeds: dict[str, torch.Tensor]) -> None:
        self.feeds = feeds

    def describe(self, layout: AdapterLayout) -> None:
        layout.slots = self.slots
        if nb.METHOD not in layout.methods:
            layout.methods.append(nb.METHOD)
