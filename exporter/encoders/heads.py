"""Trained task heads (`modules_to_save`) as per-slot head banks selected by `adapter_ids`.

PEFT saves a trained head whole (e.g. `classifier.weight`, `classifier.bias`) beside the
adapter's deltas. Runtime mode turns every parameterised leaf of the heads any adapter trains,
plus the task's label head, into a graph input `head.LEAF.PARAM` [slots, ...]: row b computes
that leaf with slot adapter_ids[b]'s parameters. Slot 0 holds the base's own head. Heads with
fewer labels are zero-padded to the largest: the padded logits are zero and the runtime drops
them, so padding changes no real logit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from peft_export.bundle import names
from peft_export.bundle.manifest import AdapterLayout
from peft_export.exporter.adapter_source import AdapterSource
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.runtime_adapters.banks import TRACE_SLOTS

_PEFT_PREFIXES = ("base_model.model.", "base_model.")
"""Where PEFT's saved keys start: LoRA-family models wrap the model once more than prompt
learning ones do."""


def _inner(key: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


_ADAPTER_PARTS = ("lora_", "ia3_l", "hada_", "lokr_", "prompt_embeddings", "adaption_")


@dataclass
class SplitAdapter:
    """An encoder adapter split in two: its deltas (a view for the LoRA-bank converter, or the
    prompt-side source as is) and its trained head parameters by model parameter path."""

    source: AdapterSource
    deltas: AdapterSource
    heads: dict[str, np.ndarray] = field(default_factory=dict)


def split_heads(source: AdapterSource) -> SplitAdapter:
    """Separate the `modules_to_save` tensors from the adapter's own (delta) tensors."""
    saved = [str(m) for m in source.config.get("modules_to_save") or []]
    head_keys = [k for k in source.header.tensors if _is_head_key(k, saved)]
    if not head_keys:
        return SplitAdapter(source, source)
    tensors = source.load_tensors()
    heads = {_inner(k): tensors[k] for k in head_keys}
    header = dataclasses.replace(
        source.header,
        tensors={k: v for k, v in source.header.tensors.items() if k not in head_keys},
    )
    config = {k: v for k, v in source.config.items() if k != "modules_to_save"}
    deltas = dataclasses.replace(source, config=config, header=header)
    return SplitAdapter(source, deltas, heads)


def _is_head_key(key: str, saved: Sequence[str]) -> bool:
    """PEFT wraps every module whose path ends with a `modules_to_save` entry (so
    `classifier` also takes DistilBERT's `pre_classifier`) and saves its parameters whole."""
    inner = _inner(key)
    if any(part in inner for part in _ADAPTER_PARTS):
        return False
    parts = inner.split(".")[:-1]
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(prefix.endswith(m) for prefix in prefixes for m in saved)


def head_leaves(model: nn.Module, params: Iterable[str], label_head: str | None) -> list[str]:
    """Dotted paths of the leaf modules the head banks replace, in model order."""
    wanted = {p.rpartition(".")[0] for p in params}
    if label_head is not None:
        wanted.add(label_head)
    leaves = []
    for path, module in model.named_modules():
        if path not in wanted:
            continue
        if not isinstance(module, nn.Linear | nn.LayerNorm):
            raise ExportError(
                f"head module {path} is a {type(module).__name__}; head banks serve Linear and "
                "LayerNorm layers: export this adapter with --mode merged"
            )
        leaves.append(path)
    missing = wanted - set(leaves)
    if missing:
        raise ExportError(
            f"an adapter trains {sorted(missing)[0]}, which this task model lacks; it was "
            "trained for another task or base: pass --task or the right --base"
        )
    return leaves


def bank_shapes(
    model: nn.Module,
    leaves: Sequence[str],
    adapters: Sequence[SplitAdapter],
    label_head: str | None,
) -> dict[str, tuple[int, ...]]:
    """Each head input's per-slot shape: the base's, with the label head's rows widened to the
    largest adapter head. Any other difference means another base: refused."""
    shapes: dict[str, tuple[int, ...]] = {}
    for leaf in leaves:
        for param, value in model.get_submodule(leaf).named_parameters(recurse=False):
            shapes[names.head_input(leaf, param)] = tuple(value.shape)
    for adapter in adapters:
        for path, value in adapter.heads.items():
            leaf, _, param = path.rpartition(".")
            key = names.head_input(leaf, param)
            base = shapes[key]
            widened = leaf == label_head and value.shape[1:] == base[1:]
            if value.shape != base and not widened:
                raise ExportError(
                    f"adapter {adapter.source.name}: head {path} has shape {list(value.shape)} "
                    f"but the base model's is {list(base)}; it was trained on another base model"
                )
            shapes[key] = (max(base[0], value.shape[0]), *base[1:])
    return shapes


def label_count(model: nn.Module, adapter: SplitAdapter | None, label_head: str) -> int:
    """Rows of the label head this adapter uses (its own, else the base's)."""
    own = None if adapter is None else adapter.heads.get(f"{label_head}.weight")
    if own is not None:
        return int(own.shape[0])
    return int(model.get_submodule(label_head).weight.shape[0])


def slot_heads(
    model: nn.Module, shapes: Mapping[str, tuple[int, ...]], adapter: SplitAdapter | None
) -> dict[str, np.ndarray]:
    """One slot's head tensors: the adapter's trained ones, the base's elsewhere, zero-padded."""
    out = {}
    for key, shape in shapes.items():
        leaf, param = names.split_head_input(key)
        path = f"{leaf}.{param}"
        value = None if adapter is None else adapter.heads.get(path)
        if value is None:
            value = model.get_parameter(path).detach().float().numpy()
        padded = np.zeros(shape, dtype=np.float32)
        padded[tuple(slice(0, n) for n in value.shape)] = value
        out[key] = padded
    return out


class HeadBanks(GraphExtension):
    """Head-bank inputs for `shapes` (head input name -> per-slot shape); declares
    `adapter_ids` itself only when no LoRA bank extension does."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        declare_ids: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shapes = dict(shapes)
        self.declare_ids = declare_ids
        self.dtype = dtype
        self._feeds: dict[str, torch.Tensor] = {}

    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        gen = torch.Generator().manual_seed(2)
        extra = [
            ExtraInput(key, ("slots", *shape), torch.randn((TRACE_SLOTS, *shape), generator=gen))
            for key, shape in self.shapes.items()
        ]
        if self.declare_ids:
            ids = torch.arange(batch, dtype=torch.int64) % TRACE_SLOTS
            extra.append(ExtraInput(names.ADAPTER_IDS, ("batch",), ids))
        return [dataclasses.replace(e, example=e.example.to(self.dtype)) for e in extra]

    def install(self, model: nn.Module) -> None:
        leaves = sorted({names.split_head_input(k)[0] for k in self.shapes})
        for leaf in leaves:
            module = model.get_submodule(leaf)
            kind = self._linear if isinstance(module, nn.Linear) else self._layer_norm
            module.forward = functools.partial(kind, module, leaf)

    def bind(self, feeds: dict[str, torch.Tensor]) -> None:
        self._feeds = feeds

    def describe(self, layout: AdapterLayout) -> None:
        return None

    def _bank(self, leaf: str, param: str) -> torch.Tensor | None:
        key = names.head_input(leaf, param)
        if key not in self.shapes:
            return None
        return self._feeds[key].index_select(0, self._feeds[names.ADAPTER_IDS])

    def _linear(self, module: nn.Linear, leaf: str, x: torch.Tensor) -> torch.Tensor:
        weight = self._bank(leaf, "weight")  # [batch, out, in]
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        y = torch.matmul(rows, weight.transpose(1, 2))
        bias = self._bank(leaf, "bias")
        if bias is not None:
            y = y + bias.unsqueeze(1)
        return y.reshape(*x.shape[:-1], weight.shape[1])

    def _layer_norm(self, module: nn.LayerNorm, leaf: str, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        weight = self._bank(leaf, "weight")
        if weight is not None:
            y = y * weight.reshape(shape)
        bias = self._bank(leaf, "bias")
        return y if bias is None else y + bias.reshape(shape)
