"""The extension point through which runtime adapters add graph inputs.

The decoder wrapper knows only the base graph interface. Each runtime-adapter family
(LoRA-family banks, prompt embeddings, AdaptionPrompt) is a GraphExtension: it declares its
extra inputs, patches the model once before tracing, and receives its inputs on every
forward. This keeps method knowledge out of the wrapper.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peft_export.bundle.manifest import AdapterLayout

if TYPE_CHECKING:
    import onnx

Dims = tuple[str | int, ...]
"""Dimension names of docs/bundle-format.md ("batch", "seq", "past", "prompt_len", "slots")
or fixed sizes. Equal names are the same dynamic dimension across all inputs."""


@dataclass(frozen=True)
class ExtraInput:
    name: str
    dims: Dims
    example: torch.Tensor
    """Tensor used for tracing; its sizes must agree with the dims of the other inputs."""


class GraphExtension(abc.ABC):
    @abc.abstractmethod
    def inputs(self, batch: int, seq: int) -> list[ExtraInput]:
        """Extra graph inputs, in order, with example tensors for the given trace sizes."""

    @abc.abstractmethod
    def install(self, model: nn.Module) -> None:
        """Patch the model (once, before tracing) so that it reads this extension's inputs."""

    def bind(self, feeds: dict[str, torch.Tensor]) -> None:  # noqa: B027
        """Receive this forward's values of the inputs declared by `inputs`, plus
        `input_ids` and `position_ids` (token banks and activated LoRA read them)."""

    def embed(self, embeds: torch.Tensor, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Transform token embeddings [batch, seq, hidden] before the decoder layers."""
        return embeds

    def describe(self, layout: AdapterLayout) -> None:  # noqa: B027
        """Record what this extension accepts in the manifest's adapter layout."""

    def onnx_translations(self) -> dict[Any, Any]:
        """Custom torch ops this extension traces, for torch.onnx's custom_translation_table."""
        return {}

    def finalize_onnx(self, model: onnx.ModelProto) -> None:  # noqa: B027
        """Edit the exported graph before it is checked and saved (e.g. add local functions)."""
