"""Loading a bundle: manifest first (validated before anything heavy), then text codec,
backend and input providers, checked against each other."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bundle import names
from peft_export.bundle.manifest import Manifest, load_manifest
from peft_export.runtime.backends import BACKENDS
from peft_export.runtime.backends.base import Backend, Feed
from peft_export.runtime.encoder import EncoderBundle
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.providers import PROVIDER_FACTORIES, InputProvider
from peft_export.runtime.request import (
    GenerationRequest,
    GenerationResult,
    Prompt,
    SamplingOptions,
    StreamCallback,
)
from peft_export.runtime.text import TextCodec
from peft_export.runtime.workspace import KVName, Workspace, WorkspacePool

KV_DTYPES = {"float32": np.float32, "float16": np.float16}


class Bundle:
    """A loaded bundle: generate with `generate(...)` or `run(GenerationRequest)`.

    Safe to share between threads: each running request takes its own workspace.
    """

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        backend: Backend,
        codec: TextCodec | None,
        providers: Sequence[InputProvider] = (),
        prefill_chunk: int = 512,
    ) -> None:
        if prefill_chunk < 1:
            raise InferenceError("prefill_chunk must be at least 1 token; pass e.g. 512")
        self.prefill_chunk = prefill_chunk
        """Prompt tokens per prefill step: bounds the logits buffer ([batch, chunk, vocab])."""
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.codec = codec
        self.input_providers: list[InputProvider] = list(providers)
        self.input_names = frozenset(spec.name for spec in backend.inputs())
        self._fixed_feeds: dict[str, Feed] | None = None
        self.fixed_version = 0
        """Bumped when providers change, so workspaces bind the fixed feeds again."""
        _check_graph(manifest, backend)
        kv_dtype = _kv_dtype(manifest)
        logits = next(s for s in backend.outputs() if s.name == names.LOGITS)
        self.workspaces = WorkspacePool(
            lambda: Workspace(backend, manifest.kv, kv_dtype, logits.dtype)
        )

    @property
    def max_positions(self) -> int | None:
        value = self.manifest.generation.get("max_position_embeddings")
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def pad_token_id(self) -> int:
        info = self.manifest.tokenizer
        if info.pad_token_id is not None:
            return info.pad_token_id
        return info.eos_token_ids[0] if info.eos_token_ids else 0

    def add_input_provider(self, provider: InputProvider) -> None:
        self.input_providers.append(provider)
        self._fixed_feeds = None
        self.fixed_version += 1

    def fixed_feeds(self) -> dict[str, Feed]:
        """The providers' feeds whose buffers never move (see InputProvider.fixed_feeds)."""
        if self._fixed_feeds is None:
            fixed: dict[str, Feed] = {}
            for provider in self.input_providers:
                fixed.update(provider.fixed_feeds())
            self._fixed_feeds = fixed
        return self._fixed_feeds

    def run(self, request: GenerationRequest) -> GenerationResult:
        from peft_export.runtime.generate import generate

        return generate(self, request)

    def generate(
        self,
        prompts: Sequence[Prompt] | Prompt,
        *,
        adapters: Sequence[str | None] | str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | int = (),
        stop_strings: Sequence[str] | str = (),
        ignore_eos: bool = False,
        chat_template: bool = True,
        system_prompt: str | None = None,
        stream: StreamCallback | None = None,
    ) -> GenerationResult:
        """Generate for one prompt or a batch. Row i samples with seed `seed + i`.

        A prompt is text, token ids, or a conversation (a list of chat message dicts)."""
        if isinstance(prompts, str) or (
            prompts and isinstance(prompts, Sequence) and isinstance(prompts[0], int | Mapping)
        ):
            prompts = [prompts]
        rows = len(prompts)
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if isinstance(stop_token_ids, int):
            stop_token_ids = (stop_token_ids,)
        options = [
            SamplingOptions(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=None if seed is None else seed + i,
                stop_token_ids=tuple(stop_token_ids),
                stop_strings=tuple(stop_strings),
                ignore_eos=ignore_eos,
            )
            for i in range(rows)
        ]
        if adapters is None or isinstance(adapters, str):
            adapters = [adapters] * rows
        request = GenerationRequest(
            prompts=list(prompts),
            options=options,
            adapters=list(adapters),
            chat_template=chat_template,
            system_prompt=system_prompt,
            stream=stream,
        )
        return self.run(request)

    def describe(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "mode": self.manifest.mode,
            "precision": self.manifest.precision,
            **self.backend.describe(),
        }


def load_bundle(
    path: str | Path,
    backend: str = "ort",
    *,
    providers: Sequence[InputProvider] = (),
    prefill_chunk: int = 512,
    **backend_options: Any,
) -> Bundle | EncoderBundle:
    """Load `path` for generation (an encoder bundle: runtime.encoder.EncoderBundle, for
    classify/tag/answer/embed). `backend_options` go to the backend (ORT: OrtOptions).

    Prompts longer than `prefill_chunk` tokens are prefilled in several steps, which bounds
    the memory of the logits (batch x chunk x vocab) without changing the result."""
    root = Path(path)
    manifest = load_manifest(root)
    if manifest.encoder is not None:
        from peft_export.runtime.encoder import load_encoder_bundle

        return load_encoder_bundle(root, manifest, backend, **backend_options)
    _kv_dtype(manifest)
    codec = TextCodec.from_bundle(root, manifest)
    backend_cls = _backend_class(backend)
    loaded = backend_cls.from_bundle(root, manifest, **backend_options)
    bundle = Bundle(root, manifest, loaded, codec, prefill_chunk=prefill_chunk)
    for factory in _provider_factories():
        provider = factory(bundle)
        if provider is not None:
            bundle.add_input_provider(provider)
    for provider in providers:
        bundle.add_input_provider(provider)
    return bundle


def _backend_class(name: str) -> type[Backend]:
    target = BACKENDS.get(name)
    if target is None:
        raise InferenceError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InferenceError(
            f"backend {name!r} is not available here ({exc}); install its extra "
            f"(pip install 'peft-export[{'trt' if name == 'trt' else 'gpu'}]') or use 'ort'"
        ) from None
    return getattr(module, attr)


def _provider_factories() -> list[Callable[[Bundle], InputProvider | None]]:
    factories = []
    for target in PROVIDER_FACTORIES:
        module_name, _, attr = target.partition(":")
        factories.append(getattr(importlib.import_module(module_name), attr))
    return factories


def _kv_dtype(manifest: Manifest) -> np.dtype:
    dtype = KV_DTYPES.get(manifest.kv.dtype)
    if dtype is None:
        raise InferenceError(
            f"KV cache dtype {manifest.kv.dtype!r} is not supported by the Python runtime; "
            "re-export with --precision fp32 or fp16"
        )
    return np.dtype(dtype)


def _check_graph(manifest: Manifest, backend: Backend) -> None:
    """The loaded graph must have the base interface the manifest promises."""
    inputs = {spec.name for spec in backend.inputs()}
    outputs = {spec.name for spec in backend.outputs()}
    kv = [KVName(i, k) for i in range(manifest.kv.num_layers) for k in ("key", "value")]
    need_in = {names.INPUT_IDS, names.ATTENTION_MASK, names.POSITION_IDS}
    need_in |= {n.past for n in kv}
    need_out = {names.LOGITS} | {n.present for n in kv}
    declared = {t.name for t in manifest.graph.inputs}
    missing = sorted((need_in - inputs) | (need_out - outputs) | (declared - inputs))
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise InferenceError(
            f"{manifest.graph.file}: the graph lacks {shown}, which the manifest promises; "
            "the bundle is inconsistent, re-export it"
        )
    _check_sizes(manifest, backend, kv)


def _check_sizes(manifest: Manifest, backend: Backend, kv: list[KVName]) -> None:
    """Sizes the runtime allocates by (vocab, KV heads and head size, bank shapes) must be the
    graph's own: a manifest that disagrees would size buffers wrong, or absurdly large."""
    want: list[tuple[str, tuple[int | None, ...]]] = [
        (names.LOGITS, (None, None, manifest.vocab_size))
    ]
    want += [(n.past, (None, manifest.kv.num_kv_heads, None, manifest.kv.head_dim)) for n in kv]
    want.append((names.PROMPT_EMBEDS, (None, None, manifest.hidden_size)))
    want += [
        (spec.name, tuple(d if isinstance(d, int) else None for d in spec.shape))
        for spec in manifest.graph.inputs
    ]
    graph = {spec.name: spec.shape for spec in [*backend.inputs(), *backend.outputs()]}
    for name, expected in want:
        shape = graph.get(name)
        if shape is None:
            continue
        pairs = zip(shape, expected, strict=False)
        if len(shape) != len(expected) or any(
            isinstance(got, int) and need is not None and got != need for got, need in pairs
        ):
            shown = [d if d is not None else "*" for d in expected]
            raise InferenceError(
                f"{manifest.graph.file}: {name} is {list(shape)} in the graph but {shown} by "
                "the manifest; the bundle is inconsistent, re-export it"
            )
