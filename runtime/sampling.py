"""Next-token choice per row: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import numpy as np

from peft_export.runtime.request import SamplingOptions


def row_rng(options: SamplingOptions) -> np.random.Generator | None:
    """A row's random stream: None for greedy rows, seeded when the row has a seed."""
    if options.greedy:
        return None
    return np.random.default_rng(options.seed)


def choose(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator | None) -> int:
    """The next token of one row from its last-position logits [vocab]."""
    if options.greedy or rng is None:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / options.temperature
    candidates = np.arange(scores.shape[0])
    if 0 < options.top_k < scores.shape[0]:
        kept = np.argpartition(-scores, options.top_k - 1)[: options.top_k]
        candidates, scores = kept, scores[kept]
    order = np.argsort(-scores, kind="stable")
    candidates, scores = candidates[order], scores[order]
    probs = np.exp(scores - scores[0])
    probs /= probs.sum()
    if options.top_p < 1.0:
        cutoff = int(np.searchsorted(np.cumsum(probs), options.top_p)) + 1
        candidates, probs = candidates[:cutoff], probs[:cutoff]
        probs = probs / probs.sum()
    pick = int(np.searchsorted(np.cumsum(probs), rng.random(), side="right"))
    return int(candidates[min(pick, len(candidates) - 1)])
