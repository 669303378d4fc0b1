"""PEFT prompt-side adapters -> bundle adapter tensors (docs/bundle-format.md).

PEFT saves prefix tuning, prompt tuning, P-tuning and CPT as `prompt_embeddings`, the output
of their encoders (prefix projection, P-tuning MLP/LSTM, CPT's token embeddings plus its
epsilon-projected delta) evaluated at save time, so conversion is a reshape. Cartridge saves
its KV cache (frozen tokens first, then the trained ones) in the same `prompt_embeddings`
layout and PEFT feeds it through prefix tuning's code path (`get_prompt`), so it converts to,
and is installed as, a prefix-tuning adapter. AdaptionPrompt saves the adapter prompt and
gate; its keys and values depend only on that prompt and the layer's k/v projections, so they
are computed here once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bundle import methods, names
from peft_export.exporter.adapter_source import AdapterSource, read_adapter
from peft_export.exporter.errors import ExportError
from peft_export.exporter.prompt_adapters.target import PromptTarget

PREFIX_TUNING = "prefix_tuning"
ADAPTION_PROMPT = "adaption_prompt"
CARTRIDGE = "cartridge"
PREFIX_KV_METHODS = (PREFIX_TUNING, CARTRIDGE)
"""Methods whose saved tensor is a prefix KV cache, converted to a prefix-tuning adapter."""
PROMPT_EMBEDS_METHODS = methods.runtime_names(methods.PROMPT_EMBEDS)
"""Prompt tuning, P-tuning and CPT: one `prompt_embeds` input serves them all."""
PROMPT_METHODS = (PREFIX_TUNING, *PROMPT_EMBEDS_METHODS, ADAPTION_PROMPT, CARTRIDGE)

ADAPTION_ARCHITECTURES = ("llama", "mistral", "gpt2")
"""Where PEFT has AdaptionPrompt: AdaptedAttention (Llama family) and AdaptedAttentionGPT."""

_ADAPTION_KEY = re.compile(
    r"(?:^|\.)(?:layers|h)\.(\d+)\.(?:self_attn|attn)\.adaption_(prompt|gate)$"
)
_BOUND_OPTION = {
    PREFIX_TUNING: ("prefix_max_len", "--prefix-max-len"),
    **{method: ("prompt_max_len", "--prompt-max-len") for method in PROMPT_EMBEDS_METHODS},
    ADAPTION_PROMPT: ("adaption_max_len", "--adaption-max-len"),
}
_INPUT_KIND = {
    "prefix_max_len": "prefix key/value",
    "prompt_max_len": "prompt embedding",
    "adaption_max_len": "AdaptionPrompt",
}


@dataclass
class PromptAdapter:
    """One converted adapter: its method, length (virtual tokens) and fp32 tensors."""

    name: str
    method: str
    length: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""


def convert_prompt_adapter(
    source: AdapterSource | str | Path,
    target: PromptTarget,
    *,
    name: str | None = None,
    base_weights: Mapping[str, Any] | None = None,
) -> PromptAdapter:
    """Convert a PEFT prompt-side adapter (folder or validated AdapterSource) for `target`.

    `base_weights` maps HF parameter names to arrays (numpy or torch); only AdaptionPrompt
    needs it, for the `k_proj`/`v_proj` weights of the adapted layers.
    """
    if not isinstance(source, AdapterSource):
        source = read_adapter(source, name=name)
    name = name or source.name
    method = source.method
    if method not in PROMPT_METHODS:
        raise ExportError(
            f"adapter {name!r} ({source.path}) is {method}, not a prompt-side method "
            f"({', '.join(PROMPT_METHODS)}); use the LoRA-family path for it"
        )
    tensors = {k: v.astype(np.float32) for k, v in source.load_tensors().items()}
    if method in PREFIX_KV_METHODS:
        adapter = _convert_prefix(source.config, tensors, target, name)
    elif method == ADAPTION_PROMPT:
        if base_weights is None:
            raise ExportError(
                f"adapter {name!r} is AdaptionPrompt: converting it needs the base weights; "
                "pass the base model (--base) so its k/v projections can be applied"
            )
        adapter = _convert_adaption(tensors, target, name, base_weights)
    else:
        adapter = _convert_prompt_embeds(source.config, tensors, target, name, method)
    adapter.source = str(source.path)
    check_bounds(adapter, target)
    return adapter


def check_bounds(adapter: PromptAdapter, target: PromptTarget) -> None:
    """Refuse an adapter longer than the bundle's graph accepts, naming the export option."""
    field_name, option = _BOUND_OPTION[adapter.method]
    bound = getattr(target, field_name)
    if bound == 0:
        raise ExportError(
            f"adapter {adapter.name!r} needs {_INPUT_KIND[field_name]} inputs, which the bundle "
            f"was exported without; re-export with {option} {adapter.length} (or more)"
        )
    if adapter.length > bound:
        raise ExportError(
            f"adapter {adapter.name!r} has {adapter.length} virtual tokens but the bundle accepts "
            f"at most {bound}; re-export with {option} {adapter.length} (or more)"
        )


def _convert_prefix(
    config: dict[str, Any], tensors: dict[str, np.ndarray], target: PromptTarget, name: str
) -> PromptAdapter:
    embeddings = _prompt_embeddings(tensors, name)
    layers = int(config.get("num_layers") or 0)
    heads = int(config.get("num_attention_heads") or 0)
    token_dim = int(config.get("token_dim") or 0)
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise ExportError(
            f"prefix adapter {name!r} is for an encoder-decoder model; only decoder-only "
            "causal LMs are supported"
        )
    expected = (target.num_layers, target.num_kv_heads, target.num_kv_heads * target.head_dim)
    if (layers, heads, token_dim) != expected:
        raise ExportError(
            f"prefix adapter {name!r} was made for another base: {layers} layers x {heads} KV "
            f"heads x {token_dim} dims, the bundle's base has {expected[0]} x {expected[1]} x "
            f"{expected[2]}; use an adapter trained on this base"
        )
    n = embeddings.shape[0]
    if embeddings.shape != (n, layers * 2 * token_dim):
        raise ExportError(
            f"prefix adapter {name!r}: prompt_embeddings has shape {list(embeddings.shape)}, "
            f"expected [{n}, {layers * 2 * token_dim}] from its config; re-save it with PEFT"
        )
    # PEFT views each virtual token's vector as [2 * layers, heads, head_dim], keys first.
    kv = embeddings.reshape(n, 2 * layers, heads, target.head_dim).transpose(1, 2, 0, 3)
    out = {}
    for layer in range(layers):
        out[names.prefix_key(layer)] = np.ascontiguousarray(kv[2 * layer])
        out[names.prefix_value(layer)] = np.ascontiguousarray(kv[2 * layer + 1])
    return PromptAdapter(name, PREFIX_TUNING, n, out)


def _convert_prompt_embeds(
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    target: PromptTarget,
    name: str,
    method: str,
) -> PromptAdapter:
    embeddings = _prompt_embeddings(tensors, name)
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise ExportError(
            f"adapter {name!r} is for an encoder-decoder model; only decoder-only causal LMs "
            "are supported"
        )
    if embeddings.ndim != 2 or embeddings.shape[1] != target.hidden_size:
        width = embeddings.shape[-1] if embeddings.ndim else 0
        raise ExportError(
            f"adapter {name!r} ({method}) has prompt embeddings of size {width}, but the "
            f"bundle's base has hidden size {target.hidden_size}; it was trained for another "
            "base model, use one trained on this base"
        )
    return PromptAdapter(name, method, embeddings.shape[0], {names.PROMPT_EMBEDS: embeddings})


def _convert_adaption(
    tensors: dict[str, np.ndarray],
    target: PromptTarget,
    name: str,
    base_weights: Mapping[str, Any],
) -> PromptAdapter:
    if target.architecture not in ADAPTION_ARCHITECTURES:
        raise ExportError(
            f"adapter {name!r} is AdaptionPrompt, supported for {', '.join(ADAPTION_ARCHITECTURES)}"
            f" bases, not {target.architecture}; use another method for this base"
        )
    prompts: dict[int, np.ndarray] = {}
    gates: dict[int, np.ndarray] = {}
    for key, value in tensors.items():
        match = _ADAPTION_KEY.search(key)
        if match is None:
            raise ExportError(
                f"adapter {name!r}: unexpected tensor {key!r} in an AdaptionPrompt adapter; "
                "re-save it with PEFT"
            )
        layer = int(match.group(1))
        (prompts if match.group(2) == "prompt" else gates)[layer] = value
    if not prompts or set(prompts) != set(gates):
        raise ExportError(
            f"adapter {name!r}: AdaptionPrompt needs a prompt and a gate per adapted layer; "
            "re-save it with PEFT"
        )
    out: dict[str, np.ndarray] = {}
    lengths = set()
    for layer in sorted(prompts):
        if layer >= target.num_layers:
            raise ExportError(
                f"adapter {name!r} adapts layer {layer} but the bundle's base has "
                f"{target.num_layers} layers; it was made for another base"
            )
        prompt = prompts[layer].reshape(-1, prompts[layer].shape[-1])
        if prompt.shape[1] != target.hidden_size:
            raise ExportError(
                f"adapter {name!r}: adapter prompt of size {prompt.shape[1]}, but the bundle's "
                f"base has hidden size {target.hidden_size}; it was made for another base"
            )
        lengths.add(prompt.shape[0])
        keys, values = _adaption_kv(target, base_weights, layer, prompt)
        for states, out_name in ((keys, names.adaption_key), (values, names.adaption_value)):
            states = states.reshape(prompt.shape[0], target.num_kv_heads, target.head_dim)
            out[out_name(layer)] = np.ascontiguousarray(states.transpose(1, 0, 2))
        out[names.adaption_gate(layer)] = gates[layer].reshape(1).astype(np.float32)
    if len(lengths) != 1:
        raise ExportError(f"adapter {name!r}: adapted layers disagree on the adapter length")
    return PromptAdapter(name, ADAPTION_PROMPT, lengths.pop(), out)


def _adaption_kv(
    target: PromptTarget, weights: Mapping[str, Any], layer: int, prompt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The layer's keys and values of the adapter prompt, as PEFT computes them."""
    if target.architecture == "gpt2":
        # Conv1D c_attn: [in, 3 * hidden] -> query | key | value.
        qkv = _linear(weights, f"transformer.h.{layer}.attn.c_attn", prompt, transposed=True)
        hidden = target.hidden_size
        return qkv[:, hidden : 2 * hidden], qkv[:, 2 * hidden :]
    attention = f"model.layers.{layer}.self_attn"
    keys = _linear(weights, f"{attention}.k_proj", prompt)
    return keys, _linear(weights, f"{attention}.v_proj", prompt)


def _linear(
    weights: Mapping[str, Any], module: str, x: np.ndarray, *, transposed: bool = False
) -> np.ndarray:
    """x @ W^T + b for nn.Linear; x @ W + b for transformers' Conv1D (`transposed`)."""
    weight = _as_numpy(weights, f"{module}.weight")
    bias = _as_numpy(weights, f"{module}.bias", required=False)
    weight = weight if transposed else weight.T
    y = x.astype(np.float64) @ weight.astype(np.float64)
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y.astype(np.float32)


def _as_numpy(weights: Mapping[str, Any], key: str, *, required: bool = True) -> np.ndarray | None:
    value = weights.get(key)
    if value is None:
        if required:
            raise ExportError(
                f"base weight {key!r} not found; AdaptionPrompt needs the base model's "
                "k/v projections; pass the base the bundle was exported from"
            )
        return None
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _prompt_embeddings(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    embeddings = tensors.get("prompt_embeddings")
    if embeddings is None:
        raise ExportError(
            f"adapter {name!r} has no 'prompt_embeddings' tensor; save it with PEFT's "
            "save_pretrained (which evaluates the prompt encoder) and retry"
        )
    return embeddings
