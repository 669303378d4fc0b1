"""The generation loop: left-padded batches, KV cache in a preallocated workspace.

Row b's text is left-padded, so every row's newest token sits in the last column and one
step serves all rows. Positions count only the columns the mask keeps (cumsum(mask) - 1),
so a padded row computes exactly what it would compute alone. Finished rows keep running
(the batch shape is fixed) on a pad token, and their outputs are ignored.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from peft_export.bundle import names
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.providers import RequestContext, Reservation, StepState
from peft_export.runtime.request import (
    GenerationRequest,
    GenerationResult,
    RowResult,
    SamplingOptions,
    TokenEvent,
)
from peft_export.runtime.sampling import choose, row_rng
from peft_export.runtime.workspace import Workspace

if TYPE_CHECKING:
    from peft_export.runtime.providers import InputProvider
    from peft_export.runtime.session import Bundle
    from peft_export.runtime.text import TextCodec


@dataclass
class RowDecoder:
    """Decoding state of one row: its tokens, text, stop checks (also used by the scheduler)."""

    options: SamplingOptions
    stop_ids: frozenset[int]
    eos_ids: frozenset[int]
    rng: np.random.Generator | None
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    text: str = ""
    streamed: int = 0
    """Characters of `text` already sent to the stream callback."""

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def accept(self, token: int, codec: TextCodec | None, need_text: bool) -> None:
        self.tokens.append(token)
        if token in self.eos_ids:
            self.reason = "eos"
        elif token in self.stop_ids:
            self.reason = "stop_token"
        if need_text and codec is not None:
            self.text = codec.decode(self.tokens)
            cut = _first_stop(self.text, self.options.stop_strings)
            if cut is not None:
                self.text = self.text[:cut]
                self.reason = self.reason or "stop_string"
        if self.reason is None and len(self.tokens) >= self.options.max_new_tokens:
            self.reason = "length"

    def stream_delta(self) -> str:
        """Text that is safe to stream now: complete characters, no possible stop-string start."""
        end = len(self.text)
        if not self.finished:
            if self.text.endswith("\ufffd"):
                end = len(self.text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.options.stop_strings), default=0)
            end = max(self.streamed, end - hold)
        delta = self.text[self.streamed : end]
        self.streamed = end
        return delta


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def generate(bundle: Bundle, request: GenerationRequest) -> GenerationResult:
    """Run one request to completion on `bundle` and return ids and text per row."""
    providers = bundle.input_providers
    _check_adapters(bundle, request, providers)
    prompt_ids = [_prompt_ids(bundle, request, i) for i in range(request.batch)]
    ctx = RequestContext(request=request, bundle=bundle, prompt_ids=prompt_ids)
    started: list[InputProvider] = []
    workspace = bundle.workspaces.acquire()
    try:
        reservation = Reservation()
        for provider in providers:
            started.append(provider)
            reservation = _merge(reservation, provider.start(ctx), provider)
        return _run(bundle, request, ctx, reservation, workspace)
    finally:
        bundle.workspaces.release(workspace)
        for provider in reversed(started):
            provider.finish(ctx)


def _check_adapters(
    bundle: Bundle, request: GenerationRequest, providers: list[InputProvider]
) -> None:
    named = sorted({a for a in request.adapters if a is not None})
    if not named:
        return
    if not any(p.accepts_adapters for p in providers):
        merged = bundle.manifest.adapters.merged
        baked = f" (adapter {merged.get('name')!r} is merged into it)" if merged else ""
        if bundle.manifest.mode == "merged" and bundle.manifest.adapters.installed:
            raise InferenceError(
                f"adapter(s) {', '.join(named)} are refit sets for a TensorRT engine built with "
                f"--refit; the {bundle.backend.name} backend runs this merged bundle as "
                "exported: run it with the trt backend, or drop --adapter"
            )
        raise InferenceError(
            f"adapter(s) {', '.join(named)} requested, but this {bundle.manifest.mode}-mode "
            f"bundle takes no adapters at run time{baked}; drop --adapter, or export with "
            "--mode runtime"
        )
    unknown = [n for n in named if not any(p.owns(n) for p in providers)]
    if unknown:
        installed = ", ".join(sorted(bundle.manifest.adapters.installed)) or "none"
        raise InferenceError(
            f"unknown adapter(s) {', '.join(unknown)} (installed: {installed}); add one with "
            f"'peft-export adapters add {bundle.root} NAME=PATH'"
        )


def _prompt_ids(bundle: Bundle, request: GenerationRequest, row: int) -> list[int]:
    prompt = request.prompts[row]
    is_chat = not isinstance(prompt, str) and bool(prompt) and isinstance(prompt[0], Mapping)
    if (isinstance(prompt, str) or is_chat) and bundle.codec is None:
        raise InferenceError("this bundle ships no tokenizer; pass token ids instead of text")
    if isinstance(prompt, str):
        ids = bundle.codec.encode_prompt(
            prompt, chat=request.chat_template, system=request.system_prompt
        )
    elif is_chat:
        ids = bundle.codec.encode_messages([dict(m) for m in prompt])
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise InferenceError(f"prompt {row} is empty after tokenization; give it some text")
    vocab = bundle.manifest.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise InferenceError(f"prompt {row} has token ids outside [0, {vocab}); check them")
    return ids


def _merge(total: Reservation, extra: Reservation | None, provider: object) -> Reservation:
    if extra is None:
        return total
    if (extra.prefix_len and total.prefix_len) or (extra.prompt_len and total.prompt_len):
        raise InferenceError(
            f"two input providers reserve the same prefix/prompt room ({provider!r}); "
            "a request may use one prefix method and one prompt method"
        )
    return Reservation(
        prefix_len=total.prefix_len or extra.prefix_len,
        prefix_mask=total.prefix_mask if total.prefix_len else extra.prefix_mask,
        prompt_len=total.prompt_len or extra.prompt_len,
        prompt_mask=total.prompt_mask if total.prompt_len else extra.prompt_mask,
    )


def _part_mask(mask: np.ndarray | None, batch: int, length: int, what: str) -> np.ndarray:
    if mask is None:
        return np.ones((batch, length), dtype=np.int64)
    if mask.shape != (batch, length):
        raise InferenceError(
            f"input provider gave a {what} mask of shape {mask.shape}, expected {(batch, length)}"
        )
    return mask.astype(np.int64)


def _run(
    bundle: Bundle,
    request: GenerationRequest,
    ctx: RequestContext,
    reservation: Reservation,
    workspace: Workspace,
) -> GenerationResult:
    manifest = bundle.manifest
    batch = request.batch
    prefix, prompt = reservation.prefix_len, reservation.prompt_len
    text_len = max(len(ids) for ids in ctx.prompt_ids)
    max_new = max(opt.max_new_tokens for opt in request.options)
    capacity = prefix + prompt + text_len + max_new
    limit = bundle.max_positions
    if limit and capacity > limit:
        raise InferenceError(
            f"prompt ({prefix + prompt + text_len} positions) + max_new_tokens ({max_new}) "
            f"exceeds the model's {limit} positions; shorten the prompt or max_new_tokens"
        )
    bundle.backend.check_steps(
        _extreme_steps(batch, prefix, prompt, text_len, max_new, bundle.prefill_chunk)
    )
    pad = bundle.pad_token_id
    vocab = manifest.vocab_size
    workspace.reserve(batch, capacity, prompt + min(text_len, bundle.prefill_chunk), vocab)

    mask = np.zeros((batch, capacity), dtype=np.int64)
    mask[:, :prefix] = _part_mask(reservation.prefix_mask, batch, prefix, "prefix")
    mask[:, prefix : prefix + prompt] = _part_mask(reservation.prompt_mask, batch, prompt, "prompt")
    input_ids = np.full((batch, text_len), pad, dtype=np.int64)
    for b, ids in enumerate(ctx.prompt_ids):
        input_ids[b, text_len - len(ids) :] = ids
        mask[b, capacity - max_new - len(ids) : capacity - max_new] = 1

    eos = frozenset(manifest.tokenizer.eos_token_ids)
    rows = [
        RowDecoder(
            options=opt,
            stop_ids=frozenset(opt.stop_token_ids),
            eos_ids=frozenset() if opt.ignore_eos else eos,
            rng=row_rng(opt),
        )
        for opt in request.options
    ]
    need_text = request.stream is not None or any(o.stop_strings for o in request.options)
    if bundle.codec is None and any(o.stop_strings for o in request.options):
        raise InferenceError(
            "stop strings need the bundle's tokenizer, which it does not ship; use stop_token_ids"
        )
    for row in rows:
        if row.options.max_new_tokens == 0:
            row.reason = "length"

    result = GenerationResult(rows=[])
    if all(row.finished for row in rows):
        return _finish(bundle, ctx, rows, need_text, result)
    runner = _Stepper(bundle, ctx, workspace, mask, prefix)
    clock = time.perf_counter()
    chunk = bundle.prefill_chunk
    for start in range(0, text_len, chunk):
        ids = input_ids[:, start : start + chunk]
        last = runner.step(ids, ids.shape[1] + (prompt if start == 0 else 0))
    result.prefill_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    decode_steps = 0
    while True:
        step_ids = np.full((batch, 1), pad, dtype=np.int64)
        for b, row in enumerate(rows):
            if row.finished:
                continue
            token = choose(last[b], row.options, row.rng)
            row.accept(token, bundle.codec, need_text)
            step_ids[b, 0] = token
            if request.stream is not None:
                request.stream(TokenEvent(b, token, row.stream_delta(), row.finished, last[b]))
        if all(row.finished for row in rows):
            break
        mask[:, runner.past_len] = 1
        last = runner.step(step_ids, 1)
        decode_steps += 1
    result.decode_seconds = time.perf_counter() - clock if decode_steps else 0.0
    result.steps = runner.index
    return _finish(bundle, ctx, rows, need_text, result)


def _extreme_steps(
    batch: int, prefix: int, prompt: int, text_len: int, max_new: int, chunk: int
) -> list[dict[str, int]]:
    """Named dims of the first and last prefill chunk and decode step (what `_run` will run)."""
    chunks = -(-text_len // chunk)
    steps = [{"batch": batch, "seq": min(chunk, text_len), "past": prefix, "prompt_len": prompt}]
    if chunks > 1:
        last = text_len - (chunks - 1) * chunk
        past = prefix + prompt + (chunks - 1) * chunk
        steps.append({"batch": batch, "seq": last, "past": past, "prompt_len": 0})
    if max_new >= 2:
        first = prefix + prompt + text_len
        for past in sorted({first, first + max_new - 2}):
            steps.append({"batch": batch, "seq": 1, "past": past, "prompt_len": 0})
    return steps


def _finish(
    bundle: Bundle,
    ctx: RequestContext,
    rows: list[RowDecoder],
    need_text: bool,
    result: GenerationResult,
) -> GenerationResult:
    for b, row in enumerate(rows):
        text = row.text if need_text or bundle.codec is None else bundle.codec.decode(row.tokens)
        result.rows.append(RowResult(ctx.prompt_ids[b], row.tokens, text, row.reason or "length"))
    return result


class _Stepper:
    """Runs steps of one request: assembles the base inputs, lets providers add theirs, binds
    the workspace buffers and advances the cache. Returns each step's last-position logits."""

    def __init__(
        self,
        bundle: Bundle,
        ctx: RequestContext,
        workspace: Workspace,
        mask: np.ndarray,
        prefix_len: int,
    ) -> None:
        self.bundle = bundle
        self.ctx = ctx
        self.workspace = workspace
        self.mask = mask
        self.past_len = prefix_len
        """Cached positions; a prefix enters as the past of step 0 (fed by its provider)."""
        self.index = 0

    def step(self, ids: np.ndarray, step_len: int) -> np.ndarray:
        past_len = self.past_len
        total = past_len + step_len
        step_mask = np.ascontiguousarray(self.mask[:, :total])
        positions = np.cumsum(step_mask, axis=1) - 1
        positions = np.where(step_mask == 0, 1, positions)[:, past_len:]
        state = StepState(
            index=self.index,
            past_len=past_len,
            input_ids=ids,
            attention_mask=step_mask,
            position_ids=np.ascontiguousarray(positions),
        )
        for name in self.workspace.kv_names:
            state.feeds[name.past] = self.workspace.past(name, past_len)
        for provider in self.bundle.input_providers:
            provider.step(self.ctx, state)
        if self.workspace.fixed_bound != self.bundle.fixed_version:
            state.feeds.update(self.bundle.fixed_feeds())
        logits = _run_step(self.bundle, self.workspace, state, total, step_len)
        self.past_len = total
        self.index += 1
        return logits[:, -1, :]


def _run_step(
    bundle: Bundle, workspace: Workspace, state: StepState, total: int, step_len: int
) -> np.ndarray:
    feeds = state.feeds
    feeds[names.INPUT_IDS] = state.input_ids
    feeds[names.ATTENTION_MASK] = state.attention_mask
    feeds[names.POSITION_IDS] = state.position_ids
    missing = bundle.input_names - feeds.keys() - bundle.fixed_feeds().keys()
    if missing:
        raise InferenceError(
            f"graph input(s) {', '.join(sorted(missing))} are fed by no input provider; "
            "this bundle needs runtime support that is not installed or not registered"
        )
    vocab = bundle.manifest.vocab_size
    logits_view = workspace.logits(step_len, vocab)
    outputs = {names.LOGITS: logits_view}
    for name in workspace.kv_names:
        outputs[name.present] = workspace.present(name, total)
    inputs = bundle.input_names
    bundle.backend.run(workspace.binding, {k: v for k, v in feeds.items() if k in inputs}, outputs)
    workspace.fixed_bound = bundle.fixed_version if bundle.backend.retains_inputs else None
    workspace.swap()
    return logits_view.numpy()
