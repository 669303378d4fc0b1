"""The traced module for encoders: a task model behind the flat graph of "Encoder graphs"
(docs/bundle-format.md).

Inputs: input_ids, attention_mask, token_type_ids (families that have them), then the
extensions' inputs (LoRA banks, head banks, adapter_ids, prompt embeddings). Outputs: the
task's (`logits`; `start_logits`/`end_logits`; `embeddings`, pooled as the model's pooling
config says). Method knowledge stays in the extensions, as for decoders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from peft_export.bundle import names
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import ExtraInput, GraphExtension
from peft_export.exporter.graph.wrapper import GraphIO
from peft_export.exporter.graph.wrapper import _shared_once as shared_once
from peft_export.models.encoders import EncoderSpec, TaskSpec

TOKEN_TYPE_IDS = "token_type_ids"
EMBEDDINGS = "embeddings"


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Mapping[str, Any]) -> torch.Tensor:
    """Sentence-transformers pooling of token states [batch, seq, hidden] under `mask`."""
    mode = pooling.get("mode", "mean")
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":
        pooled = hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    else:
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(pooled, p=2.0, dim=1) if pooling.get("normalize") else pooled


class EncoderWrapper(nn.Module):
    """forward(*inputs in `input_names` order) -> the task's outputs."""

    def __init__(
        self,
        model: nn.Module,
        spec: EncoderSpec,
        task: TaskSpec,
        extensions: Sequence[GraphExtension] = (),
        pooling: Mapping[str, Any] | None = None,
        labels: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.task = task
        self.pooling = dict(pooling or {})
        self.labels = labels
        self.extensions = list(extensions)
        for extension in self.extensions:
            extension.install(model)
        self._extra: list[ExtraInput] = []
        self.input_names: list[str] = []
        self._embeds = any(type(e).embed is not GraphExtension.embed for e in self.extensions)

    def graph_inputs(self, batch: int = 2, seq: int = 7, past: int = 0) -> list[GraphIO]:
        extra = shared_once([i for ext in self.extensions for i in ext.inputs(batch, seq)])
        seen = [i.name for i in extra]
        duplicates = {n for n in seen if seen.count(n) > 1}
        if duplicates:
            raise ExportError(
                f"graph extensions declare the same input twice ({', '.join(sorted(duplicates))})"
                "; combine those adapters into one extension"
            )
        prompt = [i for i in extra if i.name == names.PROMPT_EMBEDS]
        rest = [i for i in extra if i.name != names.PROMPT_EMBEDS]
        prompt_len = prompt[0].example.shape[1] if prompt else 0
        vocab = self.spec.vocab_size(self.model.config)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(4, vocab, (batch, seq), generator=gen, dtype=torch.int64)
        mask = torch.ones(batch, prompt_len + seq, dtype=torch.int64)
        mask[-1, -2:] = 0
        ios = [
            GraphIO(names.INPUT_IDS, ("batch", "seq"), ids),
            GraphIO(names.ATTENTION_MASK, ("batch", "prompt_len + seq" if prompt else "seq"), mask),
        ]
        if self.spec.token_type_ids:
            types = torch.zeros(batch, seq, dtype=torch.int64)
            types[:, seq // 2 :] = 1
            ios.append(GraphIO(TOKEN_TYPE_IDS, ("batch", "seq"), types))
        ios += [GraphIO(i.name, i.dims, i.example) for i in prompt + rest]
        self._extra = extra
        self.input_names = [io.name for io in ios]
        return ios

    def graph_outputs(self) -> list[GraphIO]:
        labels: int | str = self.labels or "labels"
        hidden = self.spec.hidden_size(self.model.config)
        dims = {
            "sequence-classification": {names.LOGITS: ("batch", labels)},
            "token-classification": {names.LOGITS: ("batch", "seq", labels)},
            "question-answering": {
                "start_logits": ("batch", "seq"),
                "end_logits": ("batch", "seq"),
            },
            "feature-extraction": {EMBEDDINGS: ("batch", hidden)},
        }[self.task.name]
        return [GraphIO(name, dims[name]) for name in self.task.outputs]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.input_names:
            self.graph_inputs()
        feeds = dict(zip(self.input_names, inputs, strict=True))
        extension_feeds = {i.name: feeds[i.name] for i in self._extra}
        for extension in self.extensions:
            extension.bind(extension_feeds)
        mask = feeds[names.ATTENTION_MASK]
        kwargs: dict[str, Any] = {"attention_mask": mask, "return_dict": True}
        types = feeds.get(TOKEN_TYPE_IDS)
        if self._embeds:
            embeds = self.model.get_input_embeddings()(feeds[names.INPUT_IDS])
            for extension in self.extensions:
                embeds = extension.embed(embeds, extension_feeds)
            kwargs["inputs_embeds"] = embeds
            extra = embeds.shape[1] - feeds[names.INPUT_IDS].shape[1]
            if types is not None:
                types = F.pad(types, (extra, 0))
        else:
            kwargs["input_ids"] = feeds[names.INPUT_IDS]
        if types is not None:
            kwargs[TOKEN_TYPE_IDS] = types
        out = self.model(**kwargs)
        if self.task.name == "feature-extraction":
            return (pool(out.last_hidden_state, mask, self.pooling),)
        return tuple(getattr(out, name) for name in self.task.outputs)
