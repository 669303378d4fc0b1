"""Runs inside the adapters venv (tests/adapters_venv.py), never imported by peft-export.

    python bottleneck_reference.py JOB.json

JOB: {"out": dir, and for a Llama: "base_config": Llama config kwargs, "base_weights":
safetensors of the base's state dict, "adapters": {name: {"class": BnConfig subclass name,
"kwargs": {...}, "seed": int, "safetensors": bool}}, "prompts": [[ids], ...] (equal lengths),
"steps": int}.

For each adapter: add it with the library, perturb its initial weights (so that an adapter a
graph forgets, or a zero-initialised up projection, cannot pass), train it a few steps with the
library's own training switch, save it with `save_adapter`, and record the library's forward as
the reference: prefill logits of every prompt, then a greedy loop over the full sequence (no
cache) with each step's last logits and token. Writes OUT/NAME/ and OUT/reference.npz.

Optional JOB["encoders"]: {FAMILY: {"config": config kwargs, "weights": safetensors of a
FAMILY's *ForSequenceClassification, "adapters": {...as above}, "input_ids": [[ids], ...],
"attention_mask": [[0/1], ...]}} (FAMILY: bert, roberta): the same for post-LN encoders,
saved under OUT/FAMILY/NAME, references "FAMILY.NAME.hidden" (the last hidden states) and
"FAMILY.NAME.logits".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import adapters
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

TRAIN_STEPS = 3


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, np.ndarray] = {}
    if "base_config" in job:
        results.update(_llama(job, out))
    for family, encoder in job.get("encoders", {}).items():
        results.update(_encoder(family, encoder, out / family))
    np.savez(out / "reference.npz", **results)


def _llama(job: dict, out: Path) -> dict[str, np.ndarray]:
    model = LlamaForCausalLM(LlamaConfig(**job["base_config"]))
    model.load_state_dict(load_file(job["base_weights"]), strict=True)
    adapters.init(model)
    prompts = torch.tensor(job["prompts"], dtype=torch.int64)
    results = {}
    for name, spec in job["adapters"].items():
        _add_trained(model, name, spec, prompts, out)
        model.set_active_adapters(name)
        prefill, steps, tokens = _greedy(model, prompts, job["steps"])
        results[f"{name}.prefill"] = prefill
        results[f"{name}.steps"] = steps
        results[f"{name}.tokens"] = tokens
        model.set_active_adapters(None)
    return results


def _add_trained(
    model: torch.nn.Module, name: str, spec: dict, inputs: torch.Tensor, out: Path
) -> None:
    """Add, perturb, train and save one adapter; leaves the model in eval mode. The library's
    training switch trains an encoder's task head too, and `save_adapter` saves that head
    beside the adapter (its default, `with_head=True`); the LM head stays frozen."""
    config_class = getattr(adapters, spec["class"])
    model.add_adapter(name, config=config_class(**spec["kwargs"]))
    _perturb(model, name, spec["seed"])
    _train(model, name, inputs, spec["seed"])
    out.mkdir(parents=True, exist_ok=True)
    causal = isinstance(model, LlamaForCausalLM)
    model.save_adapter(
        str(out / name), name, with_head=not causal, use_safetensors=spec["safetensors"]
    )
    model.eval()


ENCODERS = {
    "bert": (BertConfig, BertForSequenceClassification),
    "roberta": (RobertaConfig, RobertaForSequenceClassification),
}


def _encoder(family: str, job: dict, out: Path) -> dict[str, np.ndarray]:
    config_class, model_class = ENCODERS[family]
    model = model_class(config_class(**job["config"]))
    model.load_state_dict(load_file(job["weights"]), strict=True)
    adapters.init(model)
    inputs = torch.tensor(job["input_ids"], dtype=torch.int64)
    mask = torch.tensor(job["attention_mask"], dtype=torch.int64)
    results = {}
    for name, spec in job["adapters"].items():
        _add_trained(model, name, spec, inputs, out)
        model.set_active_adapters(name)
        with torch.no_grad():
            output = model(input_ids=inputs, attention_mask=mask, output_hidden_states=True)
        results[f"{family}.{name}.hidden"] = output.hidden_states[-1].numpy()
        results[f"{family}.{name}.logits"] = output.logits.numpy()
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
