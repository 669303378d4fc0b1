"""The traced module: an HF causal LM behind the flat graph interface of docs/bundle-format.md.

ONNX wants flat named tensors, transformers wants a Cache object; this wrapper converts one
into the other so that the exported graph has exactly the contract's inputs and outputs.
Method-specific inputs come only from GraphExtensions, so this file knows no adapter method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from peft_export.bundle import names
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import Dims, ExtraInput, GraphExtension
from peft_export.exporter.graph.longrope import install_row_longrope
from peft_export.exporter.graph.window_mask import SLIDING, kept_token_masks
from peft_export.models.architectures import ArchSpec, get_arch


@dataclass(frozen=True)
class GraphIO:
    """One graph input or output: its name, dim names (or sizes) and an example for tracing."""

    name: str
    dims: Dims
    example: torch.Tensor | None = None


class DecoderWrapper(nn.Module):
    """forward(*inputs in `input_names` order) -> (logits, present.0.key, present.0.value, ...)."""

    def __init__(self, model: nn.Module, extensions: Sequence[GraphExtension] = ()) -> None:
        super().__init__()
        self.model = model
        self.spec: ArchSpec = get_arch(model.config.model_type)
        self.extensions = list(extensions)
        for extension in self.extensions:
            extension.install(model)  # first: an extension may resize the vocabulary
        config = model.config
        self.num_layers = self.spec.num_layers(config)
        self.num_kv_heads = self.spec.num_kv_heads(config)
        self.head_dim = self.spec.head_dim(config)
        self.hidden_size = self.spec.hidden_size(config)
        self.vocab_size = self.spec.vocab_size(config)
        self.windows = _windows(self.spec, config)
        install_row_longrope(model)
        self._extra: list[ExtraInput] = []
        self.input_names: list[str] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def graph_inputs(self, batch: int = 2, seq: int = 3, past: int = 4) -> list[GraphIO]:
        """All inputs in contract order with trace examples; fixes `input_names` for forward."""
        extra = _shared_once([i for ext in self.extensions for i in ext.inputs(batch, seq)])
        seen = [i.name for i in extra]
        duplicates = {n for n in seen if seen.count(n) > 1}
        if duplicates:
            raise ExportError(
                f"graph extensions declare the same input twice ({', '.join(sorted(duplicates))});"
                " combine those adapters into one extension"
            )
        prompt = [i for i in extra if i.name == names.PROMPT_EMBEDS]
        rest = [i for i in extra if i.name != names.PROMPT_EMBEDS]
        prompt_len = prompt[0].example.shape[1] if prompt else 0
        total = prompt_len + seq
        kv = (batch, self.num_kv_heads, past, self.head_dim)
        kv_dims: Dims = ("batch", self.num_kv_heads, "past", self.head_dim)
        total_dims = "prompt_len + seq" if prompt else "seq"
        ios = [
            GraphIO(names.INPUT_IDS, ("batch", "seq"), _ids(batch, seq, self.vocab_size)),
            *(GraphIO(i.name, i.dims, i.example) for i in prompt),
            GraphIO(
                names.ATTENTION_MASK,
                ("batch", f"past + {total_dims}"),
                torch.ones(batch, past + total, dtype=torch.int64),
            ),
            GraphIO(
                names.POSITION_IDS,
                ("batch", total_dims),
                torch.arange(past, past + total, dtype=torch.int64).expand(batch, total).clone(),
            ),
        ]
        gen = torch.Generator().manual_seed(0)
        for layer in range(self.num_layers):
            for name in (names.past_key(layer), names.past_value(layer)):
                example = torch.randn(kv, generator=gen).to(self.dtype)
                ios.append(GraphIO(name, kv_dims, example))
        ios += [GraphIO(i.name, i.dims, i.example) for i in rest]
        self._extra = extra
        self.input_names = [io.name for io in ios]
        return ios

    def graph_outputs(self) -> list[GraphIO]:
        prompt = any(i.name == names.PROMPT_EMBEDS for i in self._extra)
        total = "prompt_len + seq" if prompt else "seq"
        kv_dims: Dims = ("batch", self.num_kv_heads, f"past + {total}", self.head_dim)
        outs = [GraphIO(names.LOGITS, ("batch", total, self.vocab_size))]
        for layer in range(self.num_layers):
            outs.append(GraphIO(names.present_key(layer), kv_dims))
            outs.append(GraphIO(names.present_value(layer), kv_dims))
        return outs

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.input_names:
            self.graph_inputs()
        if len(inputs) != len(self.input_names):
            raise ExportError(
                f"wrapper got {len(inputs)} inputs, expected {len(self.input_names)}; "
                "call graph_inputs() with the same extensions first"
            )
        feeds = dict(zip(self.input_names, inputs, strict=True))
        extension_feeds = {i.name: feeds[i.name] for i in self._extra}
        for name in (names.INPUT_IDS, names.POSITION_IDS):
            extension_feeds[name] = feeds[name]  # token rows and aLoRA read them
        for extension in self.extensions:
            extension.bind(extension_feeds)
        embeds = self.model.get_input_embeddings()(feeds[names.INPUT_IDS])
        for extension in self.extensions:
            embeds = extension.embed(embeds, extension_feeds)
        cache = DynamicCache(
            ddp_cache_data=[
                (feeds[names.past_key(i)], feeds[names.past_value(i)])
                for i in range(self.num_layers)
            ]
        )
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=self._attention_mask(feeds[names.ATTENTION_MASK], embeds),
            position_ids=feeds[names.POSITION_IDS],
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        present = out.past_key_values
        flat: list[torch.Tensor] = [out.logits]
        for layer in present.layers[: self.num_layers]:
            flat += [layer.keys, layer.values]
        return tuple(flat)

    def _attention_mask(
        self, mask: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The 2D mask as is, or, for sliding-window families, kept-token masks per layer kind
        (one tensor where the config has no layer_types: such models take a single mask)."""
        if self.windows is None:
            return mask
        masks = kept_token_masks(mask, embeds.shape[1], self.windows, embeds.dtype)
        if getattr(self.model.config, "layer_types", None):
            return masks
        (single,) = masks.values()
        return single


def _windows(spec: ArchSpec, config) -> dict[str, int | None] | None:
    """Window per layer kind when the config has sliding-window layers, else None."""
    window = spec.sliding_window(config)
    if window is None:
        return None
    kinds = set(spec.layer_kinds(config))
    return {kind: window if kind == SLIDING else None for kind in sorted(kinds)}


SHARED_INPUTS = (names.ADAPTER_IDS,)
"""Inputs several extensions may declare (every bank family selects its slot by the same
adapter_ids); the first declaration is the graph's."""


def _shared_once(extra: list[ExtraInput]) -> list[ExtraInput]:
    kept: list[ExtraInput] = []
    for item in extra:
        if item.name in SHARED_INPUTS and any(k.name == item.name for k in kept):
            continue
        kept.append(item)
    return kept


def _ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.int64)
