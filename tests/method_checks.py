"""Parity of a graph's greedy run against PEFT's own forward, with few reference forwards.

Some PEFT methods are slow to run unmerged (OFT recomputes its rotations on every forward,
about 2 s on a tiny Llama here), so instead of one reference forward per generated token,
each row is checked against ONE forward of PEFT's model over the whole sequence the graph
produced (prompt + greedy tokens): every position's logits within the bound, and the greedy
token at each step equal to PEFT's argmax there, which is what greedy identity means
(teacher forcing gives PEFT's greedy run exactly those positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ort_graph import OrtGraph

ATOL = 1e-4


def greedy_run(graph: OrtGraph, prompts: np.ndarray, steps: int, mask: np.ndarray | None = None):
    """Prefill `prompts` [batch, seq] then `steps` greedy decode steps through the KV cache.

    Returns (logits [batch, seq + steps, vocab] of every position fed, tokens [batch, steps+1]:
    the greedy token after the prompt and after each decode step)."""
    graph.reset(batch=prompts.shape[0])
    logits = [graph.step(prompts, mask)]
    tokens = [logits[-1][:, -1].argmax(-1)]
    for _ in range(steps):
        logits.append(graph.step(tokens[-1][:, None]))
        tokens.append(logits[-1][:, -1].argmax(-1))
    return np.concatenate(logits, axis=1), np.stack(tokens, axis=1)


def check_row(
    reference: torch.nn.Module,
    prompt: np.ndarray,
    logits: np.ndarray,
    tokens: np.ndarray,
    *,
    what: str,
    atol: float = ATOL,
) -> None:
    """One row: `prompt` [seq] (no padding), the graph's `logits` [seq + steps, vocab] and
    greedy `tokens` [steps + 1] against one forward of `reference` over prompt + tokens."""
    sequence = np.concatenate([prompt, tokens[:-1]])
    with torch.no_grad():
        want = reference(torch.as_tensor(sequence)[None]).logits[0].float().numpy()
    error = float(np.abs(logits - want).max())
    assert error <= atol, f"{what}: logits differ from PEFT by {error:.2e}"
    peft_greedy = want[len(prompt) - 1 :].argmax(-1)
    np.testing.assert_array_equal(tokens, peft_greedy, err_msg=f"{what}: greedy ids differ")


def check_graph(
    graph: OrtGraph,
    references: Sequence[torch.nn.Module],
    prompts: np.ndarray,
    steps: int,
    *,
    names: Sequence[str],
    pad: int = 0,
) -> None:
    """Every row of a greedy run against its own reference; row 1 left-padded by `pad`."""
    mask = np.ones_like(prompts)
    if pad:
        mask[1, :pad] = 0
    logits, tokens = greedy_run(graph, prompts, steps, mask)
    for row, (reference, name) in enumerate(zip(references, names, strict=True)):
        start = pad if row == 1 else 0
        check_row(
            reference, prompts[row, start:], logits[row, start:], tokens[row], what=f"row {name}"
        )
