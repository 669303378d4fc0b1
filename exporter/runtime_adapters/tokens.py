"""Trainable tokens and retrained embedding / output head -> one slot of the token banks.

PEFT stores these three ways, and all become the same two per-slot parts
(bundle/token_inputs.py):

- TRAINABLE_TOKENS adapters, and LoRA's `trainable_token_indices`: new values of a few rows
  of the token embedding (`...trainable_tokens_delta`, the rows of `token_indices`);
- `modules_to_save` of the embedding: the whole retrained table (saved as `PATH.weight`);
  only the rows that differ from the base become overriding rows;
- `modules_to_save` of the output head: the whole retrained head, whose difference from the
  base head is factored exactly: as (changed rows, one-hot columns) when at most `hidden` rows
  changed, else as (identity, delta). No SVD, so no rounding beyond the delta itself.

An adapter that adds tokens (trained on a base resized to more tokens) fits a graph exported
with at least as many `--extra-tokens`; every added token must come with its embedding row
and its head row, or nothing says what the model computes for it. Everything here is numpy
on float64, cast to the bundle's dtype when written.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import save_file

from peft_export.bundle import names, safetensors_io
from peft_export.bundle import token_inputs as tk
from peft_export.bundle.atomic import staged_file
from peft_export.bundle.errors import BundleError
from peft_export.bundle.manifest import TokenLayout
from peft_export.bundle.paths import confined
from peft_export.exporter.adapter_source import AdapterSource
from peft_export.exporter.errors import ExportError

if TYPE_CHECKING:
    from peft_export.exporter.runtime_adapters.convert import SlotTensors

_PEFT_PREFIX = "base_model.model."
_DELTA = "trainable_tokens_delta"
_TOKEN_ADAPTER = ".token_adapter"
TOKEN_BASE_FILE = names.adapter_file("_token_base")
"""adapters/_token_base.safetensors: the base's embedding and head [base_vocab, hidden] fp32,
which a retrained table or head is compared with when it is added later."""


@dataclass
class TokenParts:
    """One adapter's token-side tensors, unpadded (export chooses the bounds from them)."""

    vocab_size: int
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    """token id -> its overriding embedding row."""
    head_a: np.ndarray | None = None
    head_b: np.ndarray | None = None

    @property
    def head_rank(self) -> int:
        return 0 if self.head_a is None else self.head_a.shape[0]


def token_tensor_keys(source: AdapterSource) -> set[str]:
    """The adapter's tensors that are token-side (trainable tokens, modules_to_save), which
    the LoRA conversion leaves out. Path-independent: decided by the config and key names."""
    saved = [str(m) for m in source.config.get("modules_to_save") or []]
    keys = set()
    for key in source.header.tensors:
        inner = key.removeprefix(_PEFT_PREFIX)
        module = inner.rpartition(".")[0]
        if inner.endswith(_DELTA) or any(module == m or module.endswith("." + m) for m in saved):
            keys.add(key)
    return keys


def has_token_parts(source: AdapterSource) -> bool:
    return bool(token_tensor_keys(source))


def alora_tokens(source: AdapterSource) -> list[int]:
    """PEFT's `alora_invocation_tokens` (activated LoRA), or [] for an ordinary adapter."""
    tokens = source.config.get("alora_invocation_tokens") or []
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
    ):
        raise ExportError(
            f"adapter {source.name}: alora_invocation_tokens must be a list of token ids; "
            "re-save the adapter with PEFT"
        )
    return list(tokens)


def check_slot_inputs(source: AdapterSource, inputs: Collection[str]) -> None:
    """Refuse an adapter whose token parts or activation the bundle's graph cannot carry."""
    if has_token_parts(source) and tk.EMBED_INDEX not in inputs:
        raise ExportError(
            f"adapter {source.name} trains token embeddings or the output head (trainable "
            "tokens / modules_to_save), which this bundle has no token banks for; re-export "
            "with --extra-tokens, --token-rows or --head-rank (or use --mode merged)"
        )
    if alora_tokens(source) and tk.ALORA_START not in inputs:
        raise ExportError(
            f"adapter {source.name} is an activated LoRA (alora_invocation_tokens), which "
            "needs the alora_start input this bundle's graph lacks; re-export with --alora"
        )


@dataclass
class TokenBase:
    """What conversion needs of the bundle's base: sizes, module paths, embedding and head."""

    embed_path: str
    head_path: str
    embed: np.ndarray
    head: np.ndarray
    tied: bool = False

    @property
    def base_vocab(self) -> int:
        return self.embed.shape[0]

    @property
    def hidden(self) -> int:
        return self.embed.shape[1]

    @classmethod
    def from_model(cls, model: object) -> TokenBase:
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        paths = {id(m): p for p, m in model.named_modules()}
        if head is None or getattr(head, "bias", None) is not None:
            raise ExportError(
                "token banks need an output head without a bias (Llama-style lm_head); "
                "export this model's token adapters with --mode merged"
            )
        return cls(
            embed_path=paths[id(embed)],
            head_path=paths[id(head)],
            embed=embed.weight.detach().double().cpu().numpy(),
            head=head.weight.detach().double().cpu().numpy(),
            tied=head.weight is embed.weight,
        )

    def write(self, bundle_dir: Path) -> None:
        tensors = {"embed": self.embed.astype(np.float32), "head": self.head.astype(np.float32)}
        with staged_file(confined(bundle_dir, TOKEN_BASE_FILE, lexical_only=True)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "peft-export-token-base"})

    @classmethod
    def read(cls, bundle_dir: Path, layout: TokenLayout) -> TokenBase:
        path = confined(bundle_dir, TOKEN_BASE_FILE)
        try:
            tensors = safetensors_io.read_tensors(path)
        except (BundleError, OSError) as exc:
            raise ExportError(f"{path}: {exc}; re-export the bundle with its token banks") from None
        return cls(
            layout.embed_path,
            layout.head_path,
            tensors["embed"].astype(np.float64),
            tensors["head"].astype(np.float64),
        )


def convert_tokens(source: AdapterSource, base: TokenBase) -> TokenParts:
    """The adapter's overriding embedding rows and exact head-delta factors (unpadded)."""
    if base.tied:
        raise ExportError(
            f"adapter {source.name}: this base ties its output head to the embedding, which "
            "runtime token banks do not model; export the adapter with --mode merged"
        )
    tensors = {k: np.asarray(v, dtype=np.float64) for k, v in source.load_tensors().items()}
    rows: dict[int, np.ndarray] = {}
    embed_table = head_table = None
    deltas = []
    for key in sorted(token_tensor_keys(source)):
        inner = key.removeprefix(_PEFT_PREFIX)
        if inner.endswith(_DELTA):
            module = inner.removesuffix("." + _DELTA).removesuffix(_TOKEN_ADAPTER)
            deltas.append((module, tensors[key]))
            continue
        module, _, leaf = inner.rpartition(".")
        value = tensors[key]
        if leaf != "weight" or module not in (base.embed_path, base.head_path):
            raise ExportError(
                f"adapter {source.name} retrains {inner} (modules_to_save); runtime mode serves "
                f"only the token embedding ({base.embed_path}) and head ({base.head_path}): "
                "export it with --mode merged"
            )
        if value.ndim != 2 or value.shape[1] != base.hidden or value.shape[0] < base.base_vocab:
            raise ExportError(
                f"adapter {source.name}: {inner} is {list(value.shape)}, the base needs "
                f"[>= {base.base_vocab}, {base.hidden}]; it was trained on another base model"
            )
        if module == base.embed_path:
            embed_table = value
        else:
            head_table = value
    if embed_table is not None:
        known = _extended(base.embed, embed_table.shape[0])
        for token in np.flatnonzero(np.any(embed_table != known, axis=1)):
            rows[int(token)] = embed_table[token]
    for module, value in deltas:
        if module != base.embed_path:
            raise ExportError(
                f"adapter {source.name} trains tokens of {module}; runtime mode serves "
                f"trainable tokens of the token embedding ({base.embed_path}) only: export it "
                "with --mode merged"
            )
        indices = _token_indices(source, module)
        if value.shape != (len(indices), base.hidden):
            raise ExportError(
                f"adapter {source.name}: {module} trainable tokens are {list(value.shape)} for "
                f"{len(indices)} token indices; re-save the adapter with PEFT"
            )
        rows.update((int(t), v) for t, v in zip(indices, value, strict=True))
    vocab = max(
        [base.base_vocab, *(t + 1 for t in rows)]
        + [t.shape[0] for t in (embed_table, head_table) if t is not None]
    )
    parts = TokenParts(vocab_size=vocab, rows=rows)
    _check_added_tokens(source, base, parts, head_table)
    if head_table is not None:
        parts.head_a, parts.head_b = _head_factors(head_table - _extended(base.head, vocab))
    return parts


def _token_indices(source: AdapterSource, module: str) -> list[int]:
    config = source.config
    indices = config.get("token_indices") or config.get("trainable_token_indices")
    if isinstance(indices, dict):
        picked = [v for k, v in indices.items() if module == k or module.endswith("." + k)]
        indices = picked[0] if picked else None
    if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
        raise ExportError(
            f"adapter {source.name}: its config names no token indices for {module}; "
            "re-save the adapter with PEFT"
        )
    return [int(i) for i in indices]


def _check_added_tokens(
    source: AdapterSource, base: TokenBase, parts: TokenParts, head: np.ndarray | None
) -> None:
    added = range(base.base_vocab, parts.vocab_size)
    if any(t < 0 for t in parts.rows):
        raise ExportError(f"adapter {source.name}: negative token index; re-save it with PEFT")
    missing = [t for t in added if t not in parts.rows]
    if missing:
        raise ExportError(
            f"adapter {source.name} adds token {missing[0]} without its embedding row; train it "
            "with trainable_token_indices covering the added tokens"
        )
    if added and (head is None or head.shape[0] < parts.vocab_size):
        raise ExportError(
            f"adapter {source.name} adds tokens {added.start}..{added.stop - 1} without their "
            "output-head rows; save it with modules_to_save=['lm_head'] (the resized head)"
        )


def _extended(table: np.ndarray, rows: int) -> np.ndarray:
    """The base table with zero rows for tokens the base lacks (the graph's extra rows)."""
    out = np.zeros((rows, table.shape[1]))
    out[: min(rows, table.shape[0])] = table[:rows]
    return out


def _head_factors(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """delta [vocab, hidden] = B @ A exactly: changed rows with one-hot columns while that is
    the smaller rank, else the identity."""
    changed = np.flatnonzero(np.any(delta != 0, axis=1))
    hidden = delta.shape[1]
    if changed.size == 0:
        return None, None
    if changed.size <= hidden:
        b = np.zeros((delta.shape[0], changed.size))
        b[changed, np.arange(changed.size)] = 1.0
        return delta[changed], b
    return np.eye(hidden), delta


def token_layout(
    base: TokenBase, parts: Collection[TokenParts], options: Mapping[str, object]
) -> TokenLayout:
    """Bounds of the token banks: the options, else what the given adapters need (>= 1)."""
    vocab = max([base.base_vocab, *(p.vocab_size for p in parts)])
    extra = options.get("extra_tokens")
    rows = options.get("token_rows")
    rank = options.get("head_rank")
    return TokenLayout(
        base_vocab=base.base_vocab,
        extra_tokens=int(extra) if extra is not None else vocab - base.base_vocab,
        embed_rows=int(rows) if rows else max([1, *(len(p.rows) for p in parts)]),
        head_rank=int(rank) if rank else max([1, *(p.head_rank for p in parts)]),
        embed_path=base.embed_path,
        head_path=base.head_path,
    )


def fill_slot(
    slot: SlotTensors, source: AdapterSource, base: TokenBase, layout: TokenLayout
) -> None:
    """Add the adapter's token-bank tensors to its slot (which may hold its LoRA part)."""
    parts = convert_tokens(source, base)
    slot.tensors.update(pad_tokens(source.name, parts, layout))
    slot.vocab_size = parts.vocab_size if parts.vocab_size > base.base_vocab else 0


def pad_tokens(name: str, parts: TokenParts, layout: TokenLayout) -> dict[str, np.ndarray]:
    """The adapter's token-bank tensors for `layout` (slot-0 values where it has nothing);
    refuses an adapter beyond the bounds with the option that fixes it."""
    vocab = layout.base_vocab + layout.extra_tokens
    if parts.vocab_size > vocab:
        raise ExportError(
            f"adapter {name} uses {parts.vocab_size} tokens but the bundle's graph has "
            f"{vocab}; re-export with --extra-tokens {parts.vocab_size - layout.base_vocab}"
        )
    if len(parts.rows) > layout.embed_rows:
        raise ExportError(
            f"adapter {name} overrides {len(parts.rows)} embedding rows but the bundle holds "
            f"{layout.embed_rows}; re-export with --token-rows {len(parts.rows)} or more"
        )
    if parts.head_rank > layout.head_rank:
        raise ExportError(
            f"adapter {name} changes the output head at rank {parts.head_rank} but the bundle "
            f"holds rank {layout.head_rank}; re-export with --head-rank {parts.head_rank}"
        )
    out: dict[str, np.ndarray] = {}
    if parts.rows:
        index = np.zeros(vocab, dtype=np.int64)
        table = np.zeros((layout.embed_rows, next(iter(parts.rows.values())).shape[0]))
        for k, (token, row) in enumerate(sorted(parts.rows.items())):
            index[token] = k + 1
            table[k] = row
        out[tk.EMBED_INDEX] = index
        out[tk.EMBED_ROWS] = table
    if parts.head_a is not None:
        a = np.zeros((layout.head_rank, parts.head_a.shape[1]))
        a[: parts.head_rank] = parts.head_a
        b = np.zeros((vocab, layout.head_rank))
        b[: parts.head_b.shape[0], : parts.head_rank] = parts.head_b
        out[tk.HEAD_A] = a
        out[tk.HEAD_B] = b
    return out
