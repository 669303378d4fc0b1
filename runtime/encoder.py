"""Encoder bundles at run time: classify, tag, answer and embed, many adapters per batch.

    from peft_export.runtime import load_bundle
    bundle = load_bundle("bundle/")            # a BERT-family bundle
    bundle.classify(["great film", "awful"], adapters=["sentiment", "topic"])

Each row names its adapter (None: the base); rows with different adapters, heads and label
sets run in one graph call. Labels come from each adapter's file; logits past an adapter's
own label count (zero padding of the head bank) are dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peft_export.bundle import names
from peft_export.bundle.manifest import Manifest
from peft_export.bundle.paths import confined
from peft_export.runtime.encoder_slots import EncoderSlots
from peft_export.runtime.errors import InferenceError

TOKEN_TYPE_IDS = "token_type_ids"
Adapters = Sequence[str | None] | str | None


@dataclass
class Classification:
    """One row's result: the best label, its probability, and every label's probability."""

    label: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    adapter: str | None = None


@dataclass
class TokenTag:
    """One (non-special) token's label; `start`/`end` are character offsets into the text."""

    token: str
    label: str
    score: float
    start: int
    end: int


@dataclass
class Answer:
    """The best span of the context: its text, character offsets and probability."""

    text: str
    score: float
    start: int
    end: int


@dataclass
class Encoded:
    """A tokenized, right-padded batch and the tokenizer's per-row encodings."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    encodings: list[Any]


class EncoderBundle:
    """A loaded encoder bundle (see the module docstring). Safe to share between threads."""

    def __init__(self, root: Path, manifest: Manifest, backend: Any, tokenizer: Any) -> None:
        if manifest.encoder is None:
            raise InferenceError(f"{root} is not an encoder bundle; load it with load_bundle")
        self.root = root
        self.manifest = manifest
        self.info = manifest.encoder
        self.backend = backend
        self.tokenizer = tokenizer
        self.session = backend.session
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.slots = EncoderSlots(root, manifest) if manifest.mode == "runtime" else None
        self._lock = threading.Lock()

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def adapters(self) -> list[str]:
        merged = self.manifest.adapters.merged
        if merged:
            return [str(merged["name"])]
        return sorted(self.manifest.adapters.installed)

    def labels(self, adapter: str | None = None) -> list[str]:
        """The labels rows with `adapter` get (None: the base head's)."""
        if adapter is None or self.slots is None:
            self._check_merged(adapter)
            if not self.info.base_head and self.info.max_labels:
                raise InferenceError(
                    "the base model has no trained head for this task; name an adapter "
                    f"({', '.join(self.adapters) or 'none installed'})"
                )
            return list(self.info.labels)
        return self.slots.labels(adapter)

    def describe(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "task": self.task,
            "mode": self.manifest.mode,
            "adapters": self.adapters,
            **self.backend.describe(),
        }

    def encode(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        *,
        pad_to: int | None = None,
        max_length: int | None = None,
    ) -> Encoded:
        """Tokenize (sentence pairs when `pairs`), truncate to `max_length` tokens (at most
        the model's limit), right-pad to the longest row or to `pad_to` tokens."""
        if isinstance(texts, str):
            raise InferenceError('pass a list of texts, e.g. ["great film"]')
        if not texts:
            raise InferenceError("no texts given; pass at least one")
        room = self.info.max_length - self.manifest.adapters.prompt_max_len
        limit = min(max_length or room, room)
        tok = self.tokenizer
        tok.no_padding()
        if pairs is None:
            tok.enable_truncation(max_length=limit)
            encodings = tok.encode_batch(list(texts))
        else:
            tok.enable_truncation(max_length=limit, strategy="only_second")
            encodings = tok.encode_batch(list(zip(texts, pairs, strict=True)))
        width = max(len(e.ids) for e in encodings)
        if pad_to is not None:
            if pad_to < width:
                raise InferenceError(f"pad_to {pad_to} is shorter than a row ({width} tokens)")
            width = pad_to
        pad = self.manifest.tokenizer.pad_token_id or 0
        ids = np.full((len(encodings), width), pad, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        return Encoded(ids, mask, types, encodings)

    def run(self, encoded: Encoded, adapters: Adapters = None) -> dict[str, np.ndarray]:
        """The graph's raw outputs for an encoded batch (logits keep the padded label dim)."""
        rows = self._rows(adapters, len(encoded.encodings))
        feeds: dict[str, np.ndarray] = {
            names.INPUT_IDS: encoded.input_ids,
            names.ATTENTION_MASK: encoded.attention_mask,
        }
        if TOKEN_TYPE_IDS in self.input_names:
            feeds[TOKEN_TYPE_IDS] = encoded.token_type_ids
        if self.slots is None:
            for adapter in rows:
                self._check_merged(adapter)
            return self._session_run(feeds)
        chunks = self._chunks(rows)
        outputs = [self._run_chunk(feeds, rows, chunk) for chunk in chunks]
        if len(outputs) == 1 and chunks[0] == list(range(len(rows))):
            return outputs[0]
        order = np.argsort(np.concatenate([np.asarray(c) for c in chunks]))
        return {k: np.concatenate([o[k] for o in outputs])[order] for k in outputs[0]}

    def _run_chunk(
        self, feeds: dict[str, np.ndarray], rows: list[str | None], chunk: list[int]
    ) -> dict[str, np.ndarray]:
        """One graph run over rows `chunk` (same prompt length, at most `capacity` adapters):
        prompt rows get their virtual tokens in front, unmasked, as PEFT puts them."""
        assert self.slots is not None
        part = {k: v[chunk] for k, v in feeds.items()}
        if self.slots.prompt_width:
            prompts = [self.slots.prompt(rows[i]) for i in chunk]
            length = 0 if prompts[0] is None else len(prompts[0])
            embeds = np.zeros((len(chunk), length, self.slots.prompt_width), np.float32)
            for row, prompt in enumerate(prompts):
                if length:
                    embeds[row] = prompt
            part[names.PROMPT_EMBEDS] = embeds
            mask = part[names.ATTENTION_MASK]
            ones = np.ones((len(chunk), length), dtype=mask.dtype)
            part[names.ATTENTION_MASK] = np.concatenate([ones, mask], axis=1)
        with self._lock:
            part[names.ADAPTER_IDS] = self.slots.assign([rows[i] for i in chunk])
            part.update(self.slots.banks)
            return self._session_run(part)

    def classify(self, texts: Sequence[str], adapters: Adapters = None) -> list[Classification]:
        """Sequence classification: each row's label (softmax over its adapter's labels)."""
        self._expect("sequence-classification")
        rows = self._rows(adapters, len(texts))
        logits = self.run(self.encode(texts), rows)[names.LOGITS]
        out = []
        for row, adapter in enumerate(rows):
            labels = self.labels(adapter)
            probs = _softmax(logits[row, : len(labels)])
            best = int(np.argmax(probs))
            scores = {label: float(p) for label, p in zip(labels, probs, strict=True)}
            out.append(Classification(labels[best], float(probs[best]), scores, adapter))
        return out

    def tag(self, texts: Sequence[str], adapters: Adapters = None) -> list[list[TokenTag]]:
        """Token classification: a label for every non-special token of every row."""
        self._expect("token-classification")
        rows = self._rows(adapters, len(texts))
        encoded = self.encode(texts)
        logits = self.run(encoded, rows)[names.LOGITS]
        out = []
        for row, adapter in enumerate(rows):
            labels = self.labels(adapter)
            enc = encoded.encodings[row]
            tags = []
            for pos, (token, special) in enumerate(
                zip(enc.tokens, enc.special_tokens_mask, strict=True)
            ):
                if special:
                    continue
                probs = _softmax(logits[row, pos, : len(labels)])
                best = int(np.argmax(probs))
                start, end = enc.offsets[pos]
                tags.append(TokenTag(token, labels[best], float(probs[best]), start, end))
            out.append(tags)
        return out

    def answer(
        self,
        questions: Sequence[str],
        contexts: Sequence[str],
        adapters: Adapters = None,
        *,
        max_answer_tokens: int = 30,
    ) -> list[Answer]:
        """Extractive QA: the best context span by start + end logit."""
        self._expect("question-answering")
        if len(questions) != len(contexts):
            raise InferenceError("pass one context per question")
        rows = self._rows(adapters, len(questions))
        encoded = self.encode(questions, contexts)
        outputs = self.run(encoded, rows)
        out = []
        for row, context in enumerate(contexts):
            enc = encoded.encodings[row]
            positions = [i for i, s in enumerate(enc.sequence_ids) if s == 1]
            if not positions:
                out.append(Answer("", 0.0, 0, 0))
                continue
            start_logits = outputs["start_logits"][row, positions]
            end_logits = outputs["end_logits"][row, positions]
            start_p, end_p = _softmax(start_logits), _softmax(end_logits)
            scores = np.triu(np.outer(start_p, end_p))
            scores = np.tril(scores, max_answer_tokens - 1)
            first, last = np.unravel_index(int(np.argmax(scores)), scores.shape)
            begin = enc.offsets[positions[first]][0]
            end = enc.offsets[positions[last]][1]
            out.append(Answer(context[begin:end], float(scores[first, last]), begin, end))
        return out

    def embed(self, texts: Sequence[str], adapters: Adapters = None) -> np.ndarray:
        """Sentence embeddings [rows, hidden], pooled as the model's pooling config says."""
        self._expect("feature-extraction")
        return self.run(self.encode(texts), adapters)["embeddings"]

    def _session_run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.info.outputs, feeds)
        except Exception as exc:  # ORT raises private exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InferenceError(f"ONNX Runtime failed to run the encoder ({first:.200})") from None
        self.backend.after_run()
        return dict(zip(self.info.outputs, values, strict=True))

    def _rows(self, adapters: Adapters, count: int) -> list[str | None]:
        if adapters is None or isinstance(adapters, str):
            return [adapters] * count
        rows = [None if a in (None, names.NO_ADAPTER) else a for a in adapters]
        if len(rows) != count:
            raise InferenceError(f"got {len(rows)} adapters for {count} rows; pass one per row")
        return rows

    def _chunks(self, rows: list[str | None]) -> list[list[int]]:
        """Row indices per graph call: rows with the same prompt length (absolute positions
        make a padded prompt differ from PEFT's), each call mixing at most `slots.capacity`
        adapters."""
        assert self.slots is not None
        groups: dict[int, list[int]] = {}
        for i, adapter in enumerate(rows):
            prompt = self.slots.prompt(adapter)
            groups.setdefault(0 if prompt is None else len(prompt), []).append(i)
        chunks: list[list[int]] = []
        for members in groups.values():
            current: list[int] = []
            seen: set[str] = set()
            for i in members:
                adapter = rows[i]
                if adapter is not None and adapter not in seen:
                    if len(seen) == self.slots.capacity:
                        chunks.append(current)
                        current, seen = [], set()
                    seen.add(adapter)
                current.append(i)
            chunks.append(current)
        return chunks

    def _check_merged(self, adapter: str | None) -> None:
        if self.slots is not None or adapter is None:
            return
        merged = self.manifest.adapters.merged
        if not merged or merged.get("name") != adapter:
            raise InferenceError(
                f"this merged bundle serves only {self.adapters or 'the base model'}, not "
                f"{adapter!r}; export a runtime bundle to serve several adapters"
            )

    def _expect(self, task: str) -> None:
        if self.task != task:
            calls = {
                "sequence-classification": "classify",
                "token-classification": "tag",
                "question-answering": "answer",
                "feature-extraction": "embed",
            }
            raise InferenceError(
                f"this bundle's task is {self.task}; call bundle.{calls[self.task]}(...)"
            )


def load_encoder_bundle(root: Path, manifest: Manifest, backend: str = "ort", **options: Any):
    """Load an encoder bundle on ONNX Runtime (`options`: OrtOptions fields)."""
    if backend != "ort":
        raise InferenceError(f"encoder bundles run on the 'ort' backend, not {backend!r}")
    from tokenizers import Tokenizer

    from peft_export.runtime.backends.ort import OrtBackend

    path = confined(root, manifest.tokenizer.file or names.TOKENIZER)
    if not path.is_file():
        raise InferenceError(f"{path}: the bundle's tokenizer is missing; re-export the bundle")
    loaded = OrtBackend.from_bundle(root, manifest, **options)
    return EncoderBundle(root, manifest, loaded, Tokenizer.from_file(str(path)))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x))
    return z / z.sum()
