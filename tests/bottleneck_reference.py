"""Runs inside the adapters venv (tests/adapters_venv.py), never imported by peft-export.

    python bottleneck_reference.py JOB.json

JOB: {"base_config": Llama config kwargs, "base_weights": safetensors of the base's state
dict, "adapters": {name: {"class": BnConfig subclass name, "kwargs": {...}, "seed": int,
"safetensors": bool}}, "prompts": [[ids], ...] (equal lengths), "steps": int, "out": dir}.

For each adapter: add it with the library, perturb its initial weights (so that an adapter a
graph forgets, or a zero-initialised up projection, cannot pass), train it a few steps with the
library's own training switch, save it with `save_adapter`, and record the library's forward as
the reference: prefill logits of every prompt, then a greedy loop over the full sequence (no
cache) with each step's last logits and token. Writes OUT/NAME/ and OUT/reference.npz.

Optional JOB["bert"]: {"config": BertConfig kwargs, "weights": safetensors of a
BertForSequenceClassification, "adapters": {...as above}, "input_ids": [[ids], ...]}: the same
for a post-LN encoder, saved under OUT/bert/NAME, reference "bert.NAME.hidden" (the last
hidden states) and "bert.NAME.logits".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import adapters
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

TRAIN_STEPS = 3


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**job["base_config"])
    model = LlamaForCausalLM(config)
    model.load_state_dict(load_file(job["base_weights"]), strict=True)
    adapters.init(model)
    prompts = torch.tensor(job["prompts"], dtype=torch.int64)
    results: dict[str, np.ndarray] = {}
    for name, spec in job["adapters"].items():
        _add_trained(model, name, spec, prompts, out)
        model.set_active_adapters(name)
        prefill, steps, tokens = _greedy(model, prompts, job["steps"])
        results[f"{name}.prefill"] = prefill
        results[f"{name}.steps"] = steps
        results[f"{name}.tokens"] = tokens
        model.set_active_adapters(None)
    if "bert" in job:
        results.update(_bert(job["bert"], out / "bert"))
    np.savez(out / "reference.npz", **results)


def _add_trained(
    model: torch.nn.Module, name: str, spec: dict, inputs: torch.Tensor, out: Path
) -> None:
    """Add, perturb, train and save one adapter; leaves the model in eval mode."""
    config_class = getattr(adapters, spec["class"])
    model.add_adapter(name, config=config_class(**spec["kwargs"]))
    _perturb(model, name, spec["seed"])
    _train(model, name, inputs, spec["seed"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_adapter(str(out / name), name, with_head=False, use_safetensors=spec["safetensors"])
    model.eval()


def _bert(job: dict, out: Path) -> dict[str, np.ndarray]:
    model = BertForSequenceClassification(BertConfig(**job["config"]))
    model.load_state_dict(load_file(job["weights"]), strict=True)
    adapters.init(model)
    inputs = torch.tensor(job["input_ids"], dtype=torch.int64)
    results = {}
    for name, spec in job["adapters"].items():
        _add_trained(model, name, spec, inputs, out)
        model.set_active_adapters(name)
        with torch.no_grad():
            output = model(input_ids=inputs, output_hidden_states=True)
        results[f"bert.{name}.hidden"] = output.hidden_states[-1].numpy()
        results[f"bert.{name}.logits"] = output.logits.numpy()
        model.set_active_adapters(None)
    return results


def _perturb(model: torch.nn.Module, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".adapters.{name}." in key:
                noise = torch.randn(param.shape, generator=gen)
                param.add_(0.3 * noise if "scaling" not in key else 0.2 * noise)


def _train(model: torch.nn.Module, name: str, inputs: torch.Tensor, seed: int) -> None:
    """A few SGD steps through the library's training switch (LM loss, or labels 0/1)."""
    model.train_adapter(name)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    causal = isinstance(model, LlamaForCausalLM)
    labels = inputs if causal else torch.arange(len(inputs)) % 2
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _greedy(
    model: torch.nn.Module, prompts: torch.Tensor, steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits = model(input_ids=prompts).logits
        prefill = logits.numpy()
        ids = prompts
        last, tokens = [], []
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            ids = torch.cat([ids, token], dim=1)
            logits = model(input_ids=ids).logits
            last.append(logits[:, -1])
    return prefill, torch.stack(last, 1).numpy(), torch.cat(tokens, 1).numpy()


if __name__ == "__main__":
    main(sys.argv[1])
