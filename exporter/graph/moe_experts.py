"""Mixture-of-experts blocks as a graph with static shapes: every expert on every token.

transformers' eager experts loop picks the tokens of each hit expert (`nonzero`, a Python loop
over the experts that fired), which the dynamo exporter cannot trace into one graph for every
input; its `batched_mm` gathers a full weight matrix per (token, expert) pair, gigabytes per
prompt on a real model. Here each expert runs on every token and the router's top-k weights,
scattered into a dense [tokens, experts] matrix (zero where an expert was not chosen), mix the
results: standard MatMul / Equal / ReduceSum ops that ONNX Runtime and TensorRT both take, at
experts/top_k times the expert FLOPs. Unchosen experts add exact zeros, so the result equals
the eager loop up to float summation order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from peft_export.exporter.errors import ExportError

IMPLEMENTATION = "peft_export_dense"
"""The name this forward is registered under in transformers' ExpertsInterface."""


def dense_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """hidden_states [tokens, hidden], top_k_* [tokens, k] -> [tokens, hidden]."""
    experts = torch.arange(self.num_experts, device=top_k_index.device)
    chosen = (top_k_index.unsqueeze(-1) == experts).to(top_k_weights.dtype)
    mix = (chosen * top_k_weights.unsqueeze(-1)).sum(dim=1)
    gate_up = torch.matmul(hidden_states.unsqueeze(0), self.gate_up_proj.transpose(1, 2))
    gated = self._apply_gate(gate_up)
    out = torch.matmul(gated, self.down_proj.transpose(1, 2))
    weights = mix.transpose(0, 1).unsqueeze(-1).to(out.dtype)
    return (out * weights).sum(dim=0).to(hidden_states.dtype)


def _check_supported(module: nn.Module) -> None:
    flags = {
        "is_transposed": False,
        "has_bias": False,
        "has_gate": True,
        "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    }
    odd = [k for k, want in flags.items() if getattr(module, k, want) != want]
    if odd or not isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):
        raise ExportError(
            f"experts module {type(module).__name__} has a layout the exporter does not trace "
            f"({', '.join(odd) or 'no fused gate_up_proj'}); only gated, untransposed experts "
            "without biases (Mixtral, Qwen2-MoE, Qwen3-MoE) are supported"
        )


@contextlib.contextmanager
def traceable_experts(model: nn.Module, expert_parameters: tuple[str, ...]) -> Iterator[None]:
    """Run `model`'s experts blocks with `dense_experts_forward` inside the block (tracing)."""
    if not expert_parameters:
        yield
        return
    from transformers.integrations.moe import ExpertsInterface

    owners = {name.rsplit(".", 1)[0] for name in expert_parameters}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in owners:
            _check_supported(module)
    ExpertsInterface.register(IMPLEMENTATION, dense_experts_forward)
    previous = model.get_experts_implementation()
    model.set_experts_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_experts_implementation(previous)
