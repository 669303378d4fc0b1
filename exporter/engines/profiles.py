"""Optimization profiles: from the manifest's named dimensions and the CLI ranges to shapes.

The manifest names every dynamic dimension of the graph ("batch", "seq", "past",
"prompt_len", "slots", "adaption_len", or a sum such as "past + prompt_len + seq"); a profile
gives each name a min/opt/max range, and every input's shape follows by evaluating its dims.
Two profiles are built: 0 = prefill (many tokens, past usually 0), 1 = decode (one token
per row over a growing past). The runtime picks the profile by the step's sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft_export.bundle.manifest import AdapterLayout, GraphSpec, Manifest
from peft_export.exporter.errors import ExportError

PREFILL = 0
DECODE = 1
DIM_NAMES = ("batch", "seq", "past", "prompt_len", "slots", "adaption_len")

Profile = dict[str, list[int]]
"""One profile as recorded in the manifest: dimension name -> [min, opt, max]."""
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, option: str) -> DimRange:
        """'1:4:8' (min:opt:max), '1:8' (opt = max) or '8' (fixed)."""
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) == 1:
            values *= 3
        elif len(values) == 2:
            values = [values[0], values[1], values[1]]
        if len(values) != 3 or not 0 <= values[0] <= values[1] <= values[2]:
            raise ExportError(
                f"{option} {text!r} is not a range; write min:opt:max with 0 <= min <= opt <= max"
            )
        return cls(*values)

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


DEFAULT_BATCH = DimRange(1, 1, 8)
DEFAULT_SEQ = DimRange(1, 128, 512)
DEFAULT_PAST = DimRange(0, 256, 1024)


@dataclass(frozen=True)
class ProfileRequest:
    """The CLI's ranges; `seq` and `past` None: derived from the model's positions."""

    batch: DimRange = DEFAULT_BATCH
    seq: DimRange | None = None
    past: DimRange | None = None
    slots: int | None = None


def default_ranges(
    request: ProfileRequest, positions: int | None, prompt_max_len: int = 0
) -> tuple[DimRange, DimRange]:
    """--seq and --past, the defaults filled in: 1:128:512 and 0:256:1024 where they fit,
    else cut to the positions that are left (a third for prefill tokens, the rest for the
    past, or whatever the range that was given leaves), so that a model with a short
    context builds without options."""
    seq, past = request.seq, request.past
    if positions is None:
        return seq or DEFAULT_SEQ, past or DEFAULT_PAST
    room = positions - prompt_max_len
    if seq is None:
        seq = _cut(DEFAULT_SEQ, room - past.max if past else room // 3)
    if past is None:
        past = _cut(DEFAULT_PAST, room - seq.max)
    return seq, past


def _cut(default: DimRange, most: int) -> DimRange:
    most = max(most, default.min)
    if most >= default.max:
        return default
    return DimRange(default.min, min(default.opt, most), most)


def derive_profiles(manifest: Manifest, request: ProfileRequest) -> list[Profile]:
    """Prefill and decode profiles for this bundle's graph (see module docstring)."""
    limit = manifest.generation.get("max_position_embeddings")
    return plan_profiles(
        manifest.adapters,
        request,
        positions=limit if isinstance(limit, int) else None,
        banks=_uses(manifest.graph, "slots"),
    )


def plan_profiles(
    layout: AdapterLayout, request: ProfileRequest, *, positions: int | None, banks: bool
) -> list[Profile]:
    """`derive_profiles` from the parts of a manifest it reads, so that `export` can check
    the ranges against the planned layout before it exports a graph. `banks`: the graph
    has inputs sized by "slots"."""
    if request.batch.min < 1:
        raise ExportError("--batch must start at 1 or more; a batch of 0 rows cannot run")
    seq, past = default_ranges(request, positions, layout.prompt_max_len)
    if seq.min < 1:
        raise ExportError("--seq must start at 1 or more; every step feeds at least one token")
    past_max = max(past.max, layout.prefix_max_len)
    prefill: Profile = {
        "batch": request.batch.as_list(),
        "seq": seq.as_list(),
        "past": [0, min(layout.prefix_max_len, past_max), past_max],
    }
    decode: Profile = {
        "batch": request.batch.as_list(),
        "seq": [1, 1, 1],
        "past": [past.min, past.opt, past_max],
    }
    if layout.prompt_max_len > 0:
        prefill["prompt_len"] = [0, layout.prompt_max_len, layout.prompt_max_len]
        decode["prompt_len"] = [0, 0, 0]
    if layout.adaption_max_len > 0:
        adaption = [1, layout.adaption_max_len, layout.adaption_max_len]
        prefill["adaption_len"] = decode["adaption_len"] = adaption
    slots = request.slots if request.slots is not None else layout.slots
    if banks:
        if slots < 1:
            raise ExportError(
                "the graph has adapter banks but the bundle declares no slots; pass --slots N"
            )
        prefill["slots"] = decode["slots"] = [slots, slots, slots]
    total = seq.max + past_max + layout.prompt_max_len
    if positions is not None and total > positions:
        raise ExportError(
            f"--seq max + --past max ({total}) exceeds the model's {positions} positions; "
            "lower --seq or --past"
        )
    return [prefill, decode]


def input_shapes(graph: GraphSpec, profile: Profile) -> dict[str, ShapeRange]:
    """min/opt/max shape of every graph input under one profile."""
    shapes: dict[str, ShapeRange] = {}
    for spec in graph.inputs:
        per_level = [
            tuple(_evaluate(dim, profile, level, spec.name) for dim in spec.shape)
            for level in range(3)
        ]
        shapes[spec.name] = (per_level[0], per_level[1], per_level[2])
    return shapes


def shape_in_profile(
    graph: GraphSpec, profile: Profile, concrete: dict[str, tuple[int, ...]]
) -> str | None:
    """Why `concrete` input shapes do not fit `profile`, or None when they do."""
    ranges = input_shapes(graph, profile)
    for name, shape in concrete.items():
        if name not in ranges:
            return f"{name!r} is not an input of the graph"
        low, _, high = ranges[name]
        if len(shape) != len(low):
            return f"{name!r} has rank {len(shape)}, the graph expects {len(low)}"
        for axis, (value, lo, hi) in enumerate(zip(shape, low, high, strict=True)):
            if not lo <= value <= hi:
                return f"{name!r} dimension {axis} is {value}, the engine accepts {lo}..{hi}"
    return None


def _uses(graph: GraphSpec, name: str) -> bool:
    return any(
        isinstance(dim, str) and name in _terms(dim) for spec in graph.inputs for dim in spec.shape
    )


def _terms(dim: str) -> list[str]:
    return [t.strip() for t in dim.split("+")]


def _evaluate(dim: int | str, profile: Profile, level: int, tensor: str) -> int:
    if isinstance(dim, int):
        return dim
    total = 0
    for term in _terms(dim):
        if term.isdigit():
            total += int(term)
        elif term in profile:
            total += profile[term][level]
        elif term in DIM_NAMES:
            total += 0
        else:
            raise ExportError(
                f"input {tensor!r} has dimension {dim!r} that no profile range covers; "
                f"the manifest must name dimensions with {', '.join(DIM_NAMES)} (re-export)"
            )
    return total
