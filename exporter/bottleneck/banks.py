"""The bottleneck-bank GraphExtension: every adapted site reads per-slot banks by adapter_ids.

Per row b with s = adapter_ids[b], at each site (bundle/bottleneck.py for the mix columns):

    x     = h - x_drop_h[s] h + x_add_r[s] r (+ x_add_n[s] N)
    h_out = h (- o_drop_h[s] h) + o_add_r[s] r (+ o_add_n[s] N)
            + up[s] (sum_k act[s, k] f_k(down[s] x + down_bias[s])) + up_bias[s]

The sublayer output h is taken with a forward hook on the family's `output` module and the
residual r with a forward pre-hook on its `residual` module (models/architectures.py
BottleneckAttach), so the extension composes with LoRA banks patching the same modules, and
an encoder family reuses it by naming its own modules (N: post-LN families' block norm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from peft_export.bundle import bottleneck as bn
from peft_export.bundle import names
from peft_export.bundle.manifest import AdapterLayout, BottleneckLayout
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.runtime_adapters.banks import TRACE_SLOTS
from peft_export.models.architectures import ArchSpec

ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "relu6": F.relu6,
    "mish": F.mish,
    "identity": lambda z: z,
}


class BottleneckBanks(GraphExtension):
    """Bank inputs for the sites of `layout`; slot 0 (all zeros) is the base model."""

    def __init__(
        self,
        spec: ArchSpec,
        layout: BottleneckLayout,
        *,
        slots: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if spec.bottleneck is None:
            raise ExportError(
                f"bottleneck adapters are not supported on {spec.model_type}; add its "
                "`bottleneck` attachment in models/architectures.py"
            )
        if slots < 2:
            raise ExportError("--slots must be at least 2 (slot 0 is the base model)")
        unknown = [a for a in layout.activations if a not in ACTIVATION_FUNCTIONS]
        if unknown or not layout.activations:
            raise ExportError(
                f"bottleneck activations {unknown or '(none)'} are not graph activations; "
                f"use some of {', '.join(bn.ACTIVATIONS)}"
            )
        self.spec = spec
        self.layout = layout
        self.slots = slots
        self.dtype = dtype
        self.post_ln = any(a.norm for a in spec.bottleneck.values())
        self._feeds: dict[str, torch.Tensor] = {}
        self._residuals: dict[tuple[int, str], torch.Tensor] = {}

    def _shape(self, part: str) -> tuple[int, ...]:
        return bn.slot_shape(
            part, self.layout.hidden, self.layout.size, len(self.layout.activations)
        )

    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        gen = torch.Generator().manual_seed(1)
        extra = []
        for site in self.layout.sites:
            for part in bn.PARTS:
                shape = (TRACE_SLOTS, *self._shape(part))
                example = 0.1 * torch.randn(shape, generator=gen)
                name = bn.bank_input(site.layer, site.location, part)
                extra.append(ExtraInput(name, ("slots", *shape[1:]), example.to(self.dtype)))
        ids = torch.arange(batch, dtype=torch.int64) % TRACE_SLOTS
        extra.append(ExtraInput(names.ADAPTER_IDS, ("batch",), ids))
        return extra

    def install(self, model: nn.Module) -> None:
        for site in self.layout.sites:
            attach = self.spec.bottleneck.get(site.location)
            if attach is None:
                raise ExportError(
                    f"{self.spec.model_type} has no bottleneck location {site.location}"
                )
            key = (site.layer, site.location)
            output = _module(model, attach.output, site.layer)
            residual = _module(model, attach.residual, site.layer)
            norm = _module(model, attach.norm, site.layer) if attach.norm else None
            residual.register_forward_pre_hook(self._keep_residual(key, attach.residual_arg))
            output.register_forward_hook(self._adapt(key, norm))

    def bind(self, feeds: dict[str, torch.Tensor]) -> None:
        self._feeds = feeds

    def describe(self, layout: AdapterLayout) -> None:
        layout.bottleneck = self.layout
        layout.slots = self.slots
        if bn.METHOD not in layout.methods:
            layout.methods.append(bn.METHOD)

    def _keep_residual(self, key: tuple[int, str], arg: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self._residuals[key] = args[arg]

        return hook

    def _adapt(self, key: tuple[int, str], norm: nn.Module | None) -> Callable[..., object]:
        def hook(module: nn.Module, args: object, output: object) -> object:
            if isinstance(output, tuple):
                return (self._site(key, output[0], norm), *output[1:])
            return self._site(key, output, norm)

        return hook

    def _site(self, key: tuple[int, str], h: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        feeds = self._feeds
        ids = feeds[names.ADAPTER_IDS]
        r = self._residuals.pop(key)

        def rows(part: str) -> torch.Tensor:
            return feeds[bn.bank_input(key[0], key[1], part)].index_select(0, ids)

        mix = rows("mix").unsqueeze(1)  # [batch, 1, columns]

        def coef(column: str) -> torch.Tensor:
            index = bn.MIX_COLUMNS.index(column)
            return mix[:, :, index : index + 1]

        x = h - coef("x_drop_h") * h + coef("x_add_r") * r
        out = h + coef("o_add_r") * r
        if self.post_ln:
            n = norm(h + r)
            x = x + coef("x_add_n") * n
            out = out - coef("o_drop_h") * h + coef("o_add_n") * n
        z = torch.bmm(x, rows("down").transpose(1, 2)) + rows("down_bias").unsqueeze(1)
        weights = rows("act").unsqueeze(1)  # [batch, 1, activations]
        a = _mixed_activation(z, weights, self.layout.activations)
        up = torch.bmm(a, rows("up").transpose(1, 2)) + rows("up_bias").unsqueeze(1)
        return out + up


def _mixed_activation(
    z: torch.Tensor, weights: torch.Tensor, activations: Sequence[str]
) -> torch.Tensor:
    """sum_k weights[..., k] f_k(z): a one-hot per row picks its adapter's non-linearity."""
    total = None
    for k, name in enumerate(activations):
        term = weights[:, :, k : k + 1] * ACTIVATION_FUNCTIONS[name](z)
        total = term if total is None else total + term
    return total


def _module(model: nn.Module, template: str, layer: int) -> nn.Module:
    path = template.format(layer=layer)
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ExportError(
            f"bottleneck site {path} does not exist in the base model; check "
            "models/architectures.py"
        ) from None


def sites_of(spec: ArchSpec, num_layers: int) -> list[tuple[int, str]]:
    """Every site of a family: each layer, each location it attaches."""
    return [(layer, loc) for layer in range(num_layers) for loc in (spec.bottleneck or {})]
