"""Bottleneck-adapter banks (AdapterHub `adapters` library): names and slot layout.

Shared by the exporter (graph inputs, adapter files) and the runtimes (bank buffers); see
docs/bundle-format.md, "Runtime-mode bottleneck adapters". Every part's slot 0 is all zeros,
which is the base model exactly: a zero down projection makes the bottleneck output zero and
zero mix coefficients leave the sublayer output as the base computes it.
"""

from __future__ import annotations

METHOD = "bottleneck"
PREFIX = "bottleneck."
LOCATIONS = ("mh_adapter", "output_adapter")
"""The library's location keys: after the attention block, after the feed-forward block."""

PARTS = ("down", "down_bias", "up", "up_bias", "act", "mix")
MIX_COLUMNS = ("x_drop_h", "x_add_r", "x_add_n", "o_drop_h", "o_add_r", "o_add_n")
"""Per-slot coefficients of one site. With h the sublayer output, r its residual input and,
on post-LN families, N = norm(h + r) (the block's own norm):

    x     = h - x_drop_h * h + x_add_r * r + x_add_n * N          (what the bottleneck reads)
    h_out = h - o_drop_h * h + o_add_r * r + o_add_n * N + up(act(down(x)))

and the block goes on with h_out in place of h (adds r, or normalises h_out + r). Pre-LN
graphs have no N and no `_n` terms."""

ACTIVATIONS = (
    "relu",
    "gelu",
    "gelu_tanh",
    "quick_gelu",
    "silu",
    "tanh",
    "sigmoid",
    "leaky_relu",
    "relu6",
    "mish",
    "identity",
)
"""Non-linearities a graph can hold; `act` is a one-hot over the graph's own list (manifest
`adapters.bottleneck.activations`), so rows with different non-linearities share a batch."""


def bank_input(layer: int, location: str, part: str) -> str:
    """Graph input (and adapter tensor) name of one part of one site."""
    if location not in LOCATIONS or part not in PARTS:
        raise ValueError(f"unknown bottleneck site part {location!r}/{part!r}")
    return f"{PREFIX}{layer}.{location}.{part}"


def split_bank_input(name: str) -> tuple[int, str, str] | None:
    """Inverse of `bank_input`: (layer, location, part), or None for other names."""
    if not name.startswith(PREFIX):
        return None
    layer, _, rest = name[len(PREFIX) :].partition(".")
    location, _, part = rest.partition(".")
    if not layer.isdigit() or location not in LOCATIONS or part not in PARTS:
        return None
    return int(layer), location, part


def slot_shape(part: str, hidden: int, size: int, activations: int) -> tuple[int, ...]:
    """Shape of one slot of a part (`size`: the graph's largest bottleneck width)."""
    return {
        "down": (size, hidden),
        "down_bias": (size,),
        "up": (hidden, size),
        "up_bias": (hidden,),
        "act": (activations,),
        "mix": (len(MIX_COLUMNS),),
    }[part]
