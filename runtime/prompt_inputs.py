"""Prompt-side adapters at run time: prefix KV, prompt embeddings and AdaptionPrompt feeds.

One input provider serves every prompt-side method, so one batch may mix rows with prefixes
of different lengths, prompt embeddings, AdaptionPrompt adapters, other (LoRA) adapters and
no adapter. Prefixes and prompts are left-padded to the batch's longest with mask 0, so each
row computes what it would compute alone (docs/bundle-format.md); positions follow the mask.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from peft_export.bundle import methods, names
from peft_export.bundle.errors import BundleError
from peft_export.bundle.manifest import Manifest, load_manifest
from peft_export.bundle.paths import confined
from peft_export.bundle.safetensors_io import SafetensorsReader, check_finite
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.providers import InputProvider, RequestContext, Reservation, StepState

if TYPE_CHECKING:
    from peft_export.runtime.session import Bundle

PREFIX_TUNING = "prefix_tuning"
PROMPT_EMBED_METHODS = methods.runtime_names(methods.PROMPT_EMBEDS)
ADAPTION_PROMPT = "adaption_prompt"
PROMPT_METHODS = (PREFIX_TUNING, *PROMPT_EMBED_METHODS, ADAPTION_PROMPT)
MAX_ADAPTER_BYTES = 1 << 31


@dataclass(frozen=True)
class PromptAdapter:
    """A validated prompt-side adapter file: method, virtual-token count, graph-layout tensors."""

    name: str
    method: str
    length: int
    tensors: dict[str, np.ndarray]


def is_prompt_method(method: str) -> bool:
    return method in PROMPT_METHODS


def load_prompt_adapter(root: Path, manifest: Manifest, name: str) -> PromptAdapter:
    """Read `name` from the bundle and check it against the bundle's base and bounds."""
    entry = manifest.adapters.installed.get(name)
    if entry is None:
        known = ", ".join(sorted(manifest.adapters.installed)) or "none"
        raise InferenceError(
            f"unknown adapter {name!r} (installed: {known}); add it with "
            f"'peft-export adapters add {root} {name}=PATH'"
        )
    if not is_prompt_method(entry.method):
        raise InferenceError(f"adapter {name!r} is {entry.method}, not a prompt-side method")
    path = confined(root, entry.file)
    try:
        # Header and bytes from one open file: a replace between two opens would mix files.
        with SafetensorsReader(path, max_total_bytes=MAX_ADAPTER_BYTES) as reader:
            header = reader.header
            tensors, _ = reader.read_all()
        check_finite(path, tensors)
    except BundleError as exc:
        raise InferenceError(f"adapter {name!r}: {exc}") from None
    meta = header.metadata
    if meta.get("format") != names.ADAPTER_FILE_FORMAT or meta.get("method") != entry.method:
        raise InferenceError(
            f"adapter {name!r}: {entry.file} is not a {entry.method} peft-export adapter file; "
            "add the adapter again with 'peft-export adapters add'"
        )
    if meta.get("base_weights_sha256") != manifest.base_model.weights_sha256:
        raise InferenceError(
            f"adapter {name!r} was converted for another base model (weights hash differs); "
            "add it again to this bundle with 'peft-export adapters add'"
        )
    arrays = {k: v.astype(np.float32) for k, v in tensors.items() if v.dtype.kind == "f"}
    if len(arrays) != len(tensors):
        raise InferenceError(f"adapter {name!r}: non-float tensors; add it again")
    length = check_prompt_shapes(name, entry.method, arrays, manifest)
    return PromptAdapter(name, entry.method, length, arrays)


_BOUNDS = {
    PREFIX_TUNING: ("prefix_max_len", "--prefix-max-len"),
    **{method: ("prompt_max_len", "--prompt-max-len") for method in PROMPT_EMBED_METHODS},
    ADAPTION_PROMPT: ("adaption_max_len", "--adaption-max-len"),
}


def _expected_names(method: str, tensors: dict[str, np.ndarray], num_layers: int) -> set[str]:
    if method == PREFIX_TUNING:
        return {f(i) for i in range(num_layers) for f in (names.prefix_key, names.prefix_value)}
    if method == ADAPTION_PROMPT:
        parts = (names.adaption_key, names.adaption_value, names.adaption_gate)
        adapted = [i for i in range(num_layers) if names.adaption_gate(i) in tensors]
        return {f(i) for i in adapted for f in parts}
    return {names.PROMPT_EMBEDS}


def check_prompt_shapes(name: str, method: str, tensors: dict[str, np.ndarray], m: Manifest) -> int:
    """The adapter's virtual-token count, after checking it fits the bundle's base and bounds."""
    kv = m.kv
    expected = _expected_names(method, tensors, kv.num_layers)
    if not expected or set(tensors) != expected:
        raise InferenceError(
            f"adapter {name!r}: its tensors do not match a {method} adapter for this bundle's "
            "base (another base?); add it again with 'peft-export adapters add'"
        )
    if method in (PREFIX_TUNING, ADAPTION_PROMPT):
        shapes = {v.shape for k, v in tensors.items() if not k.endswith(".gate")}
        gates = {v.shape for k, v in tensors.items() if k.endswith(".gate")}
        length = next(iter(shapes))[1] if len(shapes) == 1 else -1
        if shapes != {(kv.num_kv_heads, length, kv.head_dim)} or gates - {(1,)}:
            raise InferenceError(
                f"adapter {name!r}: KV shapes {sorted(shapes)} do not fit the bundle's base "
                f"[{kv.num_kv_heads}, n, {kv.head_dim}]; it was made for another base"
            )
    else:
        embeds = tensors[names.PROMPT_EMBEDS]
        if embeds.ndim != 2 or embeds.shape[1] != m.hidden_size:
            raise InferenceError(
                f"adapter {name!r}: prompt embeddings of size {embeds.shape[-1]}, but the "
                f"bundle's base has hidden size {m.hidden_size}; use an adapter for this base"
            )
        length = embeds.shape[0]
    field_name, option = _BOUNDS[method]
    bound = getattr(m.adapters, field_name)
    if bound == 0:
        raise InferenceError(
            f"adapter {name!r} is {method} but this bundle has no {method} inputs; "
            f"re-export with {option} {length} (or more)"
        )
    if length > bound:
        raise InferenceError(
            f"adapter {name!r} has {length} virtual tokens but the bundle allows at most "
            f"{bound}; re-export with {option} {length} (or more)"
        )
    return length


class PromptBatch:
    """One request's prompt-side feeds, built once from the per-row adapters."""

    def __init__(self, rows: list[PromptAdapter | None], manifest: Manifest, dtype: np.dtype):
        self.rows = rows
        self.dtype = np.dtype(dtype)
        self.manifest = manifest
        batch = len(rows)
        prefixes = [r if r is not None and r.method == PREFIX_TUNING else None for r in rows]
        prompts = [r if r is not None and r.method in PROMPT_EMBED_METHODS else None for r in rows]
        adaptions = [r if r is not None and r.method == ADAPTION_PROMPT else None for r in rows]
        self.prefix_len = max((r.length for r in prefixes if r), default=0)
        self.prompt_len = max((r.length for r in prompts if r), default=0)
        self.prefix_mask = _left_mask(prefixes, batch, self.prefix_len)
        self.prompt_mask = _left_mask(prompts, batch, self.prompt_len)
        self.prefix_past = self._prefix_past(prefixes) if self.prefix_len else {}
        self.prompt_embeds = self._prompt_embeds(prompts)
        layout = manifest.adapters
        self.adaption = self._adaption(adaptions) if layout.adaption_max_len else {}

    def reservation(self) -> Reservation:
        return Reservation(
            prefix_len=self.prefix_len,
            prefix_mask=self.prefix_mask if self.prefix_len else None,
            prompt_len=self.prompt_len,
            prompt_mask=self.prompt_mask if self.prompt_len else None,
        )

    def step_feeds(self, step: int) -> dict[str, np.ndarray]:
        """Feeds of one step: the prefix past and prompt on step 0, AdaptionPrompt always."""
        feeds: dict[str, np.ndarray] = dict(self.adaption)
        if self.manifest.adapters.prompt_max_len:
            embeds = self.prompt_embeds
            feeds[names.PROMPT_EMBEDS] = embeds if step == 0 else embeds[:, :0]
        if step == 0:
            feeds.update(self.prefix_past)
        return feeds

    def _prefix_past(self, rows: list[PromptAdapter | None]) -> dict[str, np.ndarray]:
        kv = self.manifest.kv
        shape = (len(rows), kv.num_kv_heads, self.prefix_len, kv.head_dim)
        past = {}
        for layer in range(kv.num_layers):
            for kind, name in (
                (names.prefix_key(layer), names.past_key(layer)),
                (names.prefix_value(layer), names.past_value(layer)),
            ):
                out = np.zeros(shape, dtype=self.dtype)
                for b, row in enumerate(rows):
                    if row is not None:
                        out[b, :, self.prefix_len - row.length :] = row.tensors[kind]
                past[name] = out
        return past

    def _prompt_embeds(self, rows: list[PromptAdapter | None]) -> np.ndarray:
        hidden = self.manifest.hidden_size
        out = np.zeros((len(rows), self.prompt_len, hidden), dtype=self.dtype)
        for b, row in enumerate(rows):
            if row is not None:
                out[b, self.prompt_len - row.length :] = row.tensors[names.PROMPT_EMBEDS]
        return out

    def _adaption(self, rows: list[PromptAdapter | None]) -> dict[str, np.ndarray]:
        kv = self.manifest.kv
        length = max((r.length for r in rows if r), default=1)
        batch = len(rows)
        feeds = {names.ADAPTION_MASK: _left_mask(rows, batch, length)}
        for layer in range(kv.num_layers):
            keys = np.zeros((batch, kv.num_kv_heads, length, kv.head_dim), dtype=self.dtype)
            values = np.zeros_like(keys)
            gates = np.zeros((batch,), dtype=self.dtype)
            for b, row in enumerate(rows):
                if row is None or names.adaption_gate(layer) not in row.tensors:
                    continue
                keys[b, :, length - row.length :] = row.tensors[names.adaption_key(layer)]
                values[b, :, length - row.length :] = row.tensors[names.adaption_value(layer)]
                gates[b] = row.tensors[names.adaption_gate(layer)][0]
            feeds[names.adaption_key(layer)] = keys
            feeds[names.adaption_value(layer)] = values
            feeds[names.adaption_gate(layer)] = gates
        return feeds


def _left_mask(rows: list[PromptAdapter | None], batch: int, length: int) -> np.ndarray:
    mask = np.zeros((batch, length), dtype=np.int64)
    for b, row in enumerate(rows):
        if row is not None:
            mask[b, length - row.length :] = 1
    return mask


class PromptInputProvider(InputProvider):
    """Resolves prompt-side adapter names of a request; other names are left to other
    providers. Loaded adapters stay in host memory until `drop`; a changed manifest.json
    (`adapters add`, `--replace`) is re-read, and a replaced adapter file is reloaded."""

    accepts_adapters = True

    def __init__(self, root: Path, manifest: Manifest, dtype: np.dtype) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.dtype = np.dtype(dtype)
        self._held: OrderedDict[str, tuple[str, PromptAdapter]] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity: int | None = None
        """Adapters kept in host memory (LRU); None keeps every one loaded. A running request
        holds its own reference, so eviction never takes an adapter from under it."""
        self.counters = {"hits": 0, "misses": 0, "evictions": 0}
        self._manifest_stamp = self._stamp()

    def inputs(self) -> set[str]:
        layout = self.manifest.adapters
        out = {names.PROMPT_EMBEDS} if layout.prompt_max_len else set()
        if layout.adaption_max_len:
            out.add(names.ADAPTION_MASK)
            for layer in range(self.manifest.kv.num_layers):
                out |= {names.adaption_key(layer), names.adaption_value(layer)}
                out.add(names.adaption_gate(layer))
        return out

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def drop(self, name: str) -> None:
        with self._lock:
            self._held.pop(name, None)

    def owns(self, name: str) -> bool:
        """Whether `name` is a prompt-side adapter of the bundle (re-reads a changed manifest)."""
        self._refresh_manifest()
        entry = self.manifest.adapters.installed.get(name)
        return entry is not None and is_prompt_method(entry.method)

    def _resolve(self, name: str | None) -> PromptAdapter | None:
        """This provider's adapter for a row; None for no adapter or another method's."""
        return self.get(name) if name is not None and self.owns(name) else None

    def get(self, name: str) -> PromptAdapter:
        manifest = self.manifest
        entry = manifest.adapters.installed.get(name)
        digest = entry.sha256 if entry is not None else ""
        with self._lock:
            held = self._held.get(name)
            if held is not None and held[0] == digest:
                self._held.move_to_end(name)
                self.counters["hits"] += 1
                return held[1]
            self.counters["misses"] += 1
        adapter = load_prompt_adapter(self.root, manifest, name)
        with self._lock:
            self._held[name] = (digest, adapter)
            self._held.move_to_end(name)
            while self.capacity is not None and len(self._held) > max(self.capacity, 1):
                self._held.popitem(last=False)
                self.counters["evictions"] += 1
        return adapter

    def stats(self) -> dict[str, int]:
        """Host-tier hits, misses, evictions and the number of adapters held."""
        with self._lock:
            return {**self.counters, "size": len(self._held)}

    def start(self, ctx: RequestContext) -> Reservation | None:
        rows = [self._resolve(name) for name in ctx.request.adapters]
        batch = PromptBatch(rows, self.manifest, self.dtype)
        ctx.state[self] = batch
        return batch.reservation()

    def step(self, ctx: RequestContext, state: StepState) -> None:
        state.feeds.update(ctx.state[self].step_feeds(state.index))

    def _stamp(self) -> int:
        try:
            return (self.root / names.MANIFEST).stat().st_mtime_ns
        except OSError:
            return 0

    def _refresh_manifest(self) -> None:
        stamp = self._stamp()
        if stamp == self._manifest_stamp:
            return
        try:
            fresh = load_manifest(self.root)
        except BundleError:
            return
        self._manifest_stamp = stamp
        if fresh.base_model.weights_sha256 == self.manifest.base_model.weights_sha256:
            self.manifest = fresh


def provider_for_bundle(bundle: Bundle) -> PromptInputProvider | None:
    """PROVIDER_FACTORIES entry: a provider when the bundle accepts prompt-side adapters."""
    manifest = bundle.manifest
    prompt_side = any(is_prompt_method(m) for m in manifest.adapters.methods)
    if manifest.mode != "runtime" or not prompt_side:
        return None
    kv_input = next(s for s in bundle.backend.inputs() if s.name == names.past_key(0))
    return PromptInputProvider(bundle.root, manifest, kv_input.dtype)
