"""Model execution for the scheduler: prefill chunks of a group, decode steps of the batch.

The graph has one sequence dimension per call, so a step runs up to two calls:

- a **prefill** call for the group of newly admitted rows (left-padded like `generate`, with
  their prefix KV, prompt embeddings and adapters), as many tokens (padding included) as
  `StepBudget` allows: `step_token_budget` when no row decodes, else what fits in a share of
  a decode call's time; when its last chunk ran, each row's cache (the columns its mask
  kept) joins the decode pool;
- a **decode** call with one token for every running row, each with its own adapter slot.

Putting a prefill chunk into the decode call instead would make every decoding row compute
a chunk of padded tokens, so a 256-token chunk would cost the decode batch 256 times its work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from peft_export.bundle import names
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.prompt_inputs import ADAPTION_PROMPT, PromptBatch
from peft_export.runtime.scheduler.kv_pool import DecodePool
from peft_export.runtime.scheduler.step_budget import StepBudget
from peft_export.runtime.workspace import Workspace

if TYPE_CHECKING:
    from peft_export.runtime.backends.base import Feed, TensorView
    from peft_export.runtime.scheduler.paging import RowAdapter
    from peft_export.runtime.session import Bundle


@dataclass
class PrefillGroup:
    """Rows prefilled together: one left-padded batch, a chunk of text tokens per call."""

    row_ids: list[int]
    adapters: list[RowAdapter]
    prompts: PromptBatch | None
    mask: np.ndarray
    """[rows, prefix + prompt + text], as `generate` builds it."""
    input_ids: np.ndarray
    prefix_len: int
    prompt_len: int
    done_tokens: int = 0
    index: int = 0
    past_len: int = 0

    @property
    def text_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def finished(self) -> bool:
        return self.done_tokens >= self.text_len


class BatchRunner:
    """Runs prefill and decode calls on one bundle with preallocated buffers."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        max_rows: int,
        kv_pool_tokens: int,
        prefill_pool_tokens: int,
        step_token_budget: int,
        prefill_share: float = 0.75,
        min_prefill_tokens: int = 16,
        whole_prefill_tokens: int = 256,
    ) -> None:
        self.bundle = bundle
        manifest = bundle.manifest
        self.vocab = manifest.vocab_size
        self.budget = StepBudget(step_token_budget, prefill_share, min_prefill_tokens)
        self.whole_tokens = min(whole_prefill_tokens, step_token_budget)
        """Groups up to this many prompt tokens are prefilled in one call, rows decoding or not."""
        self.prefill_pool_tokens = prefill_pool_tokens
        self.workspace = Workspace(
            bundle.backend, manifest.kv, _kv_dtype(bundle), _logits_dtype(bundle)
        )
        self.workspace.reserve(1, prefill_pool_tokens, step_token_budget, self.vocab)
        self.pool = DecodePool(
            bundle.backend,
            self.workspace.kv_names,
            manifest.kv.num_kv_heads,
            manifest.kv.head_dim,
            _kv_dtype(bundle),
            kv_pool_tokens,
        )
        self._logits = bundle.backend.allocate(
            _logits_dtype(bundle), max_rows * self.vocab, on_host=True
        )
        self._binding = bundle.backend.new_binding()
        self._fixed_bound: int | None = None
        layout = manifest.adapters
        self.prompt_side = bool(layout.prompt_max_len or layout.adaption_max_len)
        self.has_prefix = bool(layout.prefix_max_len)
        self._prompt_manifest = manifest
        self._prompt_dtype = _kv_dtype(bundle)
        self._decode_prompt: tuple[tuple[int, ...], dict[str, np.ndarray]] | None = None
        self.adaption_of: dict[int, object] = {}
        self.seconds = {"prefill": 0.0, "decode": 0.0, "kv_moves": 0.0}
        """Time in prefill calls, decode calls (trims included), and rows joining/leaving."""
        self.calls = {"prefill": 0, "decode": 0}
        self.decode_positions = {"used": 0, "layout": 0}
        """Over all decode steps: positions rows attend to, and rows x (P + 1) computed."""

    # -- prefill ----------------------------------------------------------------------

    def new_group(
        self, row_ids: list[int], prompt_ids: list[list[int]], adapters: list[RowAdapter]
    ) -> PrefillGroup:
        rows = len(row_ids)
        prompts = None
        prefix = prompt = 0
        if self.prompt_side or self.has_prefix:
            prompts = PromptBatch(
                [a.prompt for a in adapters], self._prompt_manifest, self._prompt_dtype
            )
            prefix, prompt = prompts.prefix_len, prompts.prompt_len
        text_len = max(len(ids) for ids in prompt_ids)
        capacity = prefix + prompt + text_len
        mask = np.zeros((rows, capacity), dtype=np.int64)
        if prompts is not None:
            mask[:, :prefix] = prompts.prefix_mask
            mask[:, prefix : prefix + prompt] = prompts.prompt_mask
        input_ids = np.full((rows, text_len), self.bundle.pad_token_id, dtype=np.int64)
        for b, ids in enumerate(prompt_ids):
            input_ids[b, text_len - len(ids) :] = ids
            mask[b, capacity - len(ids) :] = 1
        chunk = self.budget.cap // rows - prompt
        if chunk < 1 or rows * capacity > self.prefill_pool_tokens:
            raise InferenceError(
                f"a prefill group of {rows} rows x {capacity} positions does not fit the "
                f"step budget ({self.budget.cap}) or prefill pool ({self.prefill_pool_tokens})"
            )
        step = prompt + min(chunk, text_len)
        self.workspace.reserve(rows, capacity, step, self.vocab)
        return PrefillGroup(
            row_ids=list(row_ids),
            adapters=list(adapters),
            prompts=prompts,
            mask=mask,
            input_ids=input_ids,
            prefix_len=prefix,
            prompt_len=prompt,
            past_len=prefix,
        )

    def group_tokens(self) -> int:
        """Prompt tokens (rows x padded length) a new group of several rows may hold: one
        call's worth, so it is prefilled in one call."""
        return max(self.whole_tokens, self.budget.tokens(decoding=bool(self.pool.rows)))

    def prefill(self, group: PrefillGroup) -> np.ndarray | None:
        """Run the group's next chunk (all of it when the group is short, else sized by
        `StepBudget`); the rows' last logits [rows, vocab] after the last."""
        clock = time.perf_counter()
        rows = len(group.row_ids)
        prompt = group.prompt_len if group.index == 0 else 0
        decoding = bool(self.pool.rows)
        left = group.text_len - group.done_tokens
        if group.index == 0 and rows * (prompt + left) <= self.whole_tokens:
            chunk = left
        else:
            chunk = max(1, self.budget.tokens(decoding) // rows - prompt)
        start = group.done_tokens
        ids = group.input_ids[:, start : start + chunk]
        step_len = ids.shape[1] + prompt
        past_len = group.past_len
        total = past_len + step_len
        step_mask = np.ascontiguousarray(group.mask[:, :total])
        positions = np.cumsum(step_mask, axis=1) - 1
        positions = np.where(step_mask == 0, 1, positions)[:, past_len:]
        feeds: dict[str, Feed] = {
            name.past: self.workspace.past(name, past_len) for name in self.workspace.kv_names
        }
        if group.prompts is not None:
            feeds.update(group.prompts.step_feeds(group.index))
        feeds[names.INPUT_IDS] = np.ascontiguousarray(ids)
        feeds[names.ATTENTION_MASK] = step_mask
        feeds[names.POSITION_IDS] = np.ascontiguousarray(positions)
        feeds[names.ADAPTER_IDS] = np.array([a.slot for a in group.adapters], dtype=np.int64)
        outputs: dict[str, TensorView] = {
            name.present: self.workspace.present(name, total) for name in self.workspace.kv_names
        }
        logits = self.workspace.logits(step_len, self.vocab)
        outputs[names.LOGITS] = logits
        self._run(self.workspace.binding, feeds, outputs, own_binding=False)
        self.workspace.swap()
        group.past_len = total
        group.done_tokens += ids.shape[1]
        group.index += 1
        seconds = self._account("prefill", clock)
        self.budget.observe_prefill(rows * step_len, seconds, decoding)
        if not group.finished:
            return None
        return logits.numpy()[:, -1, :].copy()

    def join_decode(self, group: PrefillGroup, b: int) -> None:
        """Move row `b` of a prefilled group into the decode pool (its kept columns only)."""
        clock = time.perf_counter()
        total = group.past_len
        keep = np.flatnonzero(group.mask[b, :total])
        kv = {}
        for name in self.workspace.kv_names:
            full = self.workspace.past(name, total).numpy()
            kv[name] = full[b][:, keep, :]
        self.pool.join(group.row_ids[b], kv)
        adapter = group.adapters[b]
        if adapter.prompt is not None and adapter.prompt.method == ADAPTION_PROMPT:
            self.adaption_of[group.row_ids[b]] = adapter.prompt
        self.seconds["kv_moves"] += time.perf_counter() - clock

    # -- decode -----------------------------------------------------------------------

    def leave(self, row_id: int) -> None:
        clock = time.perf_counter()
        self.pool.leave(row_id)
        self.adaption_of.pop(row_id, None)
        self.seconds["kv_moves"] += time.perf_counter() - clock

    def decode(self, tokens: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One token for every pool row (batch order = `pool.rows`): logits [rows, vocab]."""
        clock = time.perf_counter()
        pool = self.pool
        if not pool.fits_step():
            pool.trim()
        rows = len(pool.rows)
        self.decode_positions["used"] += sum(pool.lengths) + rows
        self.decode_positions["layout"] += rows * (pool.past + 1)
        feeds: dict[str, Feed] = {name.past: pool.past_view(name) for name in pool.kv_names}
        if self.prompt_side:
            feeds.update(self._decode_prompt_feeds())
        feeds[names.INPUT_IDS] = np.ascontiguousarray(tokens.reshape(rows, 1), dtype=np.int64)
        feeds[names.ATTENTION_MASK] = pool.step_mask()
        feeds[names.POSITION_IDS] = pool.positions()
        feeds[names.ADAPTER_IDS] = np.ascontiguousarray(slots, dtype=np.int64)
        outputs: dict[str, TensorView] = {
            name.present: pool.present_view(name) for name in pool.kv_names
        }
        logits = self._logits.view((rows, 1, self.vocab))
        outputs[names.LOGITS] = logits
        self._run(self._binding, feeds, outputs, own_binding=True)
        pool.advance()
        self.budget.observe_decode(self._account("decode", clock))
        return logits.numpy()[:, 0, :]

    def _decode_prompt_feeds(self) -> dict[str, np.ndarray]:
        """AdaptionPrompt keys/values/gates of the pool's rows (rebuilt when rows change)."""
        key = tuple(self.pool.rows)
        if self._decode_prompt is None or self._decode_prompt[0] != key:
            rows = [self.adaption_of.get(r) for r in key]
            batch = PromptBatch(rows, self._prompt_manifest, self._prompt_dtype)
            self._decode_prompt = (key, batch.step_feeds(1))
        return self._decode_prompt[1]

    # -- both -------------------------------------------------------------------------

    def _run(self, binding, feeds, outputs, *, own_binding: bool) -> None:
        bundle = self.bundle
        inputs = bundle.input_names
        bound = self._fixed_bound if own_binding else self.workspace.fixed_bound
        if bound != bundle.fixed_version:
            feeds.update(bundle.fixed_feeds())
        missing = inputs - feeds.keys() - bundle.fixed_feeds().keys()
        if missing:
            raise InferenceError(
                f"graph input(s) {', '.join(sorted(missing))} are fed by nothing the scheduler "
                "knows; serve this bundle with Bundle.generate"
            )
        bundle.backend.run(binding, {k: v for k, v in feeds.items() if k in inputs}, outputs)
        retained = bundle.fixed_version if bundle.backend.retains_inputs else None
        if own_binding:
            self._fixed_bound = retained
        else:
            self.workspace.fixed_bound = retained

    def _account(self, kind: str, clock: float) -> float:
        seconds = time.perf_counter() - clock
        self.seconds[kind] += seconds
        self.calls[kind] += 1
        return seconds


def _kv_dtype(bundle: Bundle) -> np.dtype:
    spec = next(s for s in bundle.backend.inputs() if s.name == names.past_key(0))
    return np.dtype(spec.dtype)


def _logits_dtype(bundle: Bundle) -> np.dtype:
    spec = next(s for s in bundle.backend.outputs() if s.name == names.LOGITS)
    return np.dtype(spec.dtype)
