"""PyTorch/PEFT references and runtime runs with logits for tests/test_smollm2.py.

References are greedy: the LoRA family through PEFT's forward with a KV cache (cheap on a
30-layer model), prompt-side methods through PEFT's forward on the whole sequence with no
cache, because PEFT's cache and generate paths mishandle them (docs/known-issues.md).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cli_run import run_cli  # noqa: F401 - test_smollm2 imports it from here
from prompt_helpers import run_rows

PROMPT_SIDE_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "ADAPTION_PROMPT")


@dataclass
class Greedy:
    tokens: list[int]
    logits: np.ndarray
    """[len(tokens), vocab]: the logits each token was chosen from."""


def chat_ids(tokenizer, text: str) -> list[int]:
    """The prompt as transformers' chat template tokenizes it (the reference side)."""
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(encoded["input_ids"]) if hasattr(encoded, "keys") else list(encoded)


def peft_model(base: torch.nn.Module, adapter_dir: Path | None) -> torch.nn.Module:
    """PEFT model on a copy of the base (the shared base stays unwrapped); None: the base."""
    if adapter_dir is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


@torch.no_grad()
def cached_greedy(model: torch.nn.Module, ids: list[int], n: int) -> Greedy:
    """Greedy over the model's forward with its KV cache (LoRA family and the base)."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    tokens, logits = [], []
    while True:
        step = out.logits[0, -1].float()
        tokens.append(int(step.argmax()))
        logits.append(step.numpy())
        if len(tokens) == n:
            return Greedy(tokens, np.stack(logits))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)


@torch.no_grad()
def full_greedy(model: torch.nn.Module, ids: list[int], n: int) -> Greedy:
    """Greedy over the model's forward on the whole sequence every step (prompt-side)."""
    seq = list(ids)
    logits = []
    for _ in range(n):
        tensor = torch.tensor([seq])
        step = model(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits[0, -1]
        logits.append(step.float().numpy())
        seq.append(int(logits[-1].argmax()))
    return Greedy(seq[len(ids) :], np.stack(logits))


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """PyTorch with denormals flushed: PEFT's unmerged DoRA ran 2.6x faster on SmolLM2."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def runtime_greedy(
    bundle, prompts: list[list[int]], adapters: list[str | None], n: int
) -> list[Greedy]:
    """The bundle's greedy tokens per row and the logits each was chosen from."""
    rows = run_rows(bundle, prompts, adapters, n)
    return [
        Greedy(row.tokens, row.logits[len(ids) - 1 :].astype(np.float32))
        for row, ids in zip(rows, prompts, strict=True)
    ]


def agreeing_logits_error(got: Greedy, reference: Greedy) -> float:
    """Max abs logits error over the steps up to and including the first differing token."""
    steps = len(reference.tokens)
    for i, (a, b) in enumerate(zip(got.tokens, reference.tokens, strict=True)):
        if a != b:
            steps = i + 1
            break
    return float(np.abs(got.logits[:steps] - reference.logits[:steps]).max())


def seeded_adapters(base: torch.nn.Module, folder: Path) -> list[tuple[str, Path]]:
    """Two rank-8 LoRA adapters on different modules with B drawn so that they matter
    (scripts/bench_cpp.py: a bundle that needs no trained examples)."""
    from peft import LoraConfig, get_peft_model

    out = []
    targets = {"qv": ["q_proj", "v_proj"], "mlp": ["o_proj", "down_proj", "up_proj"]}
    for seed, (name, modules) in enumerate(targets.items()):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=modules))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0.0, 0.05)
        model.save_pretrained(folder / name)
        out.append((name, folder / name))
    return out


def linked_copy(bundle: Path, target: Path) -> Path:
    """A copy of `bundle` whose files are hard links (cheap; atomic writes replace links)."""
    shutil.copytree(bundle, target, copy_function=_link)
    return target


def _link(src: str, dst: str) -> None:
    Path(dst).hardlink_to(src)
