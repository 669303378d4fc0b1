"""LoRA-family methods and the bank inputs each fills (docs/bundle-format.md).

A runtime bundle serves an adapter when its graph has an input for every tensor the adapter
fills, whatever method names the bundle was exported with: rsLoRA, AdaLoRA, LoHa and LoKr
fill A and B like LoRA, so every bank graph serves them; DoRA also fills `out_scale`; IA3
fills `out_scale` (and `bias_scale`) on the modules whose output it scales and `in_scale` on
its feed-forward modules; the methods factored exactly into A/B (VeRA, OFT, ...; the registry
in bundle/methods.py) fill A and B only. The exporter and both runtimes gate on inputs, not
on names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from peft_export.bundle import methods, names

LORA_METHODS = methods.bank_names()
"""Methods served by bank inputs (bundle/methods.py), in registry order."""
BANK_ONLY_METHODS = tuple(
    name
    for name in methods.runtime_names(methods.BANKS, methods.BANKS_FACTORED)
    if not methods.get_method(name).needs_base_weights
)
"""Methods that fill only A and B from the adapter alone: every graph with LoRA banks serves
them (those that read the base weights, OFT, HRA, ..., need the bundle to keep them)."""
SCALE_PARTS = ("out_scale", "in_scale", "bias_scale")


def bank_parts(methods: Iterable[str], has_bias: bool, *, in_scale: bool = True) -> tuple[str, ...]:
    """Bank inputs of one module in a graph built for `methods`, in `names.LORA_PARTS` order;
    `in_scale`: whether this module gets IA3's input scale when ia3 is among them."""
    methods = set(methods)
    wanted = {"A", "B"}
    if methods & {"dora", "ia3"}:
        wanted.add("out_scale")
    if "ia3" in methods:
        if in_scale:
            wanted.add("in_scale")
        if has_bias:
            wanted.add("bias_scale")
    return tuple(p for p in names.LORA_PARTS if p in wanted)


def accepted_methods(methods: Sequence[str]) -> list[str]:
    """The methods a bank graph built for `methods` serves: those and every A/B-only method,
    in LORA_METHODS order (what the manifest records as `adapters.methods`)."""
    wanted = {*methods, *BANK_ONLY_METHODS}
    return [m for m in LORA_METHODS if m in wanted]


def needs_base_weights(names_: Iterable[str]) -> bool:
    """Whether any of these methods reads the base weights of its target modules when an
    adapter is converted (the bundle then keeps them: adapters/_base_targets.safetensors)."""
    return any((m := methods.get_method(n)) is not None and m.needs_base_weights for n in names_)
