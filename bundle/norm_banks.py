"""Norm-weight banks of LN tuning (PEFT `LN_TUNING`): names shared by the exporter and runtimes.

An LN-tuning adapter retrains the weight (and, where the norm has one, the bias) of some norm
layers. Runtime graphs serve it with one bank per tuned norm parameter, `norm.PATH.weight` and
`norm.PATH.bias` of shape [slots, features], selected per row by `adapter_ids` like the LoRA
banks. A bank holds the adapter's parameter minus the base's, so slot 0 (all zeros) is the
base norm exactly, and a slot whose adapter leaves a norm alone keeps it; the graph computes the
norm with base + bank[adapter_ids[row]]. The base parameters of every banked norm are kept in
`adapters/_base_norms.safetensors`, so `adapters add` converts an adapter without re-export
(see docs/bundle-format.md, "Runtime-mode LN tuning").
"""

from __future__ import annotations

METHOD = "ln_tuning"
PREFIX = "norm."
PARTS = ("weight", "bias")
BASE_NORMS = "_base_norms"
"""Adapter-folder file stem of the base norm parameters (`PATH.weight`, `PATH.bias`, fp32)."""


def bank_input(path: str, part: str) -> str:
    """Graph input (and adapter tensor) name of one parameter of one norm layer."""
    if part not in PARTS:
        raise ValueError(f"unknown norm bank part {part!r}")
    return f"{PREFIX}{path}.{part}"


def split_bank_input(name: str) -> tuple[str, str] | None:
    """Inverse of `bank_input`: (norm path, part), or None for other names."""
    if not name.startswith(PREFIX):
        return None
    path, _, part = name[len(PREFIX) :].rpartition(".")
    return (path, part) if path and part in PARTS else None
