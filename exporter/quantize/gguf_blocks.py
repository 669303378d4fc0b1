"""A GGUF base's own Q4_0 / Q4_1 / Q8_0 blocks, as BlockQuantized keyed by HF parameter names.

Requantizing the fp32 weights that transformers dequantized from a GGUF would quantize twice;
carrying the file's blocks keeps the base exactly as its publisher quantized it. Every value
here is chosen so that `BlockQuantized.dequantize()` equals, bit for bit, both
`gguf.quants.dequantize` and the weight transformers loads from the same file, except the
few Q4_1 blocks `GgufBlocks.inexact_blocks` counts (see `q4_1_blocks`). Scales may be
negative: Q4_0's d often is, and Q4_1 blocks may be stored mirrored (codes 15 - q, scale -d).

The GGUF tensor of an HF weight is found the way transformers' GGUF loader finds it
(`modeling_gguf_pytorch_utils.get_gguf_hf_weights_map`: gguf-py's tensor-name map of the
model's architecture, applied to the module name), and the loader's tensor processing is
mirrored exactly:
- GGUF architecture "llama": attn_q / attn_k rows are reverse-permuted (llama.cpp interleaves
  the rotary halves of each head); a row permutation, applied here to codes, scales and zero
  points alike. Like transformers, only when the file states both head counts.
- "gpt2": transformers transposes the Conv1D weights ([in, out]); the GGUF tensor is already in
  the [out, in] layout BlockQuantized uses, so `dequantize().T` is the HF parameter.
- "qwen2": nothing.
A tied lm_head (no output.weight in the file, so transformers ties it) gets token_embd's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from peft_export.exporter.errors import ExportError
from peft_export.exporter.quantize.blocks import BlockQuantized

GGUF_BLOCK = 32
CARRIED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
"""GGUF types whose blocks map exactly onto MatMulNBits' form, and their code width."""
ZERO_POINT_WINDOW = 4
"""float32 neighbours tried on each side of a Q4_1 zero point's quotient (SmolLM2 needs 1)."""
# HF model_type -> the GGUF `general.architecture` transformers loads it from. Mistral is left
# out: transformers loads a "mistral" GGUF through a gguf-py tensor map that does not exist.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
ROTARY_PERMUTED = ("attn_q", "attn_k")


@dataclass(frozen=True)
class GgufBlocks:
    """A GGUF base's linear weights: carried exactly, or to be dequantized and requantized."""

    blocks: dict[str, BlockQuantized]
    """HF weight name -> the file's own blocks (Q4_0, Q4_1, Q8_0)."""
    requantized: dict[str, str]
    """HF weight name -> GGUF type name ("Q6_K", "F16", ...) of the weights not carried."""
    inexact_blocks: dict[str, int]
    """HF weight name -> Q4_1 blocks whose minimum no float32 zero point reproduces exactly
    (only names with at least one); those blocks dequantize about an ulp of m off the file."""

    @property
    def inexact_total(self) -> int:
        return sum(self.inexact_blocks.values())


def read_gguf_blocks(gguf_path: str | Path, model: torch.nn.Module) -> GgufBlocks:
    """The blocks of every linear weight of `model`, the transformers model loaded from the file.

    Raises ExportError when the file is unreadable, its architecture is not supported here, or
    `model` does not match it (a weight with no tensor in the file, or of another shape).
    """
    reader = _open_reader(Path(gguf_path))
    architecture = _string_field(reader, "general.architecture")
    model_type = str(getattr(model.config, "model_type", ""))
    _check_architecture(model_type, architecture, gguf_path)
    names = gguf.get_tensor_name_map(_gguf_arch(architecture), int(model.config.num_hidden_layers))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    heads = _rotary_heads(reader, architecture)
    aliases = _tied_names(model)

    blocks: dict[str, BlockQuantized] = {}
    requantized: dict[str, str] = {}
    inexact: dict[str, int] = {}
    for hf_name, expected in _linear_weights(model).items():
        tensor = _find_tensor(hf_name, aliases, names, tensors, gguf_path)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if shape != expected:
            raise ExportError(
                f"GGUF tensor {tensor.name} is {list(shape)} but the model's {hf_name} is "
                f"{list(expected)} (as [out, in]); pass the model transformers loads from "
                f"{gguf_path}"
            )
        kind = tensor.tensor_type.name
        if kind not in CARRIED_BITS:
            requantized[hf_name] = kind
            continue
        quantized, misses = _decode(np.asarray(tensor.data), kind, shape)
        rows = _row_order(tensor.name, shape[0], heads)
        if rows is not None:
            quantized = _take_rows(quantized, rows)
        blocks[hf_name] = quantized
        if misses:
            inexact[hf_name] = misses
    return GgufBlocks(blocks=blocks, requantized=requantized, inexact_blocks=inexact)


def _open_reader(path: Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, OSError, struct errors, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(
            f"could not read GGUF {path} ({type(exc).__name__}: {first}); pass a valid .gguf file"
        ) from exc
    if reader.byte_order == "S":
        # gguf-py leaves quantized blocks unswapped: their float16 scales would read wrong.
        raise ExportError(
            f"GGUF {path} has the other byte order than this machine; its blocks cannot be "
            "carried: use a GGUF of this machine's byte order"
        )
    return reader


def _field(reader: gguf.GGUFReader, key: str) -> np.ndarray | None:
    field = reader.fields.get(key)
    return None if field is None or not field.data else field.parts[field.data[0]]


def _string_field(reader: gguf.GGUFReader, key: str) -> str:
    part = _field(reader, key)
    return "" if part is None else bytes(part).decode("utf-8")


def _int_field(reader: gguf.GGUFReader, key: str) -> int | None:
    part = _field(reader, key)
    return None if part is None else int(part[0])


def _check_architecture(model_type: str, architecture: str, gguf_path: str | Path) -> None:
    expected = GGUF_ARCHITECTURES.get(model_type)
    if expected is None:
        supported = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise ExportError(
            f"carrying GGUF blocks is not supported for model_type {model_type!r} (supported: "
            f"{supported}); let the base's weights be requantized instead"
        )
    if architecture != expected:
        raise ExportError(
            f"GGUF {gguf_path} holds a {architecture!r} model but the model is "
            f"{model_type!r}; pass the model transformers loads from that file"
        )


def _gguf_arch(architecture: str) -> gguf.MODEL_ARCH:
    for arch, name in gguf.MODEL_ARCH_NAMES.items():
        if name == architecture:
            return arch
    raise ExportError(
        f"the installed gguf package has no tensor map for {architecture!r}; upgrade it "
        "(pip install -U gguf)"
    )


def _rotary_heads(reader: gguf.GGUFReader, architecture: str) -> tuple[int, int] | None:
    """(heads, kv heads) when transformers reverse-permutes attn_q / attn_k rows, else None."""
    if architecture != "llama":
        return None
    heads = _int_field(reader, "llama.attention.head_count")
    kv_heads = _int_field(reader, "llama.attention.head_count_kv")
    return None if heads is None or kv_heads is None else (heads, kv_heads)


def _linear_weights(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """HF weight name -> its [out, in] shape, for every nn.Linear and transformers Conv1D."""
    from transformers.pytorch_utils import Conv1D

    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):
            shapes[f"{name}.weight"] = (module.nf, module.nx)
    return shapes


def _tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of the same tensor (a tied lm_head and its embedding)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def _find_tensor(
    hf_name: str,
    aliases: dict[str, list[str]],
    names: gguf.TensorNameMap,
    tensors: dict[str, gguf.ReaderTensor],
    gguf_path: str | Path,
) -> gguf.ReaderTensor:
    """The GGUF tensor transformers loads into `hf_name` (or into a parameter tied to it)."""
    candidates = [hf_name] + [other for other in aliases[hf_name] if other != hf_name]
    for candidate in candidates:
        module_name, _, suffix = candidate.rpartition(".")
        gguf_name = names.get_name(module_name)
        if gguf_name is not None and f"{gguf_name}.{suffix}" in tensors:
            return tensors[f"{gguf_name}.{suffix}"]
    raise ExportError(
        f"GGUF {gguf_path} has no tensor for the model's {hf_name}; pass the model "
        "transformers loads from that file"
    )


def _decode(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> tuple[BlockQuantized, int]:
    """The blocks of one tensor, in file row order, and its inexact Q4_1 block count."""
    rows, cols = shape
    per_block = raw.reshape(rows * cols // GGUF_BLOCK, -1)
    d = _half(per_block[:, 0:2])
    misses = 0
    if kind == "Q8_0":
        codes = per_block[:, 2:] ^ np.uint8(0x80)  # int8 q + 128, as unsigned bits
        zero = np.full(d.shape, 128, dtype=np.uint8)
    else:
        packed = per_block[:, 2:] if kind == "Q4_0" else per_block[:, 4:]
        # Each byte holds element j (low nibble) and element j + 16 (high nibble).
        codes = np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1)
        if kind == "Q4_0":
            zero = np.full(d.shape, 8, dtype=np.uint8)
        else:
            codes, d, zero, exact = q4_1_blocks(codes, d, _half(per_block[:, 2:4]))
            misses = int(exact.size - np.count_nonzero(exact))
    blocks = (rows, cols // GGUF_BLOCK)
    quantized = BlockQuantized(
        codes=codes.reshape(rows, cols),
        scales=d.reshape(blocks),
        zero_points=zero.reshape(blocks),
        bits=CARRIED_BITS[kind],
        block_size=GGUF_BLOCK,
        source=f"gguf:{kind}",
    )
    return quantized, misses


def _half(two_bytes: np.ndarray) -> np.ndarray:
    """float16 fields (little-endian byte pairs [n, 2]) as float32 [n], exactly."""
    return np.ascontiguousarray(two_bytes).view(np.float16)[:, 0].astype(np.float32)


def q4_1_blocks(
    q: np.ndarray, d: np.ndarray, m: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codes [n, 32], scales, float zero points and exactness [n] for Q4_1 blocks w = d*q + m.

    GGUF computes float32(d*q + m) (d*q is exact: 11 by 4 significant bits). MatMulNBits
    computes float32(c*s - float32(z*s)); with c = q, s = d it is the same number when z*d
    rounds to exactly -m. For about one block in ten no float32 z does (consecutive z*d step
    by up to 2 ulps of m), so those blocks are stored mirrored, c = 15 - q and s = -d, which
    is exact when z*(-d) rounds to -(15d + m): a second, largely independent chance. Blocks
    where neither hits (0.035% of SmolLM2's Q4_1 blocks) keep c = q, s = d and the nearest
    z: each of their values is off by float32(z*d) + m, at most one ulp of m on SmolLM2. A
    constant block (d == 0) is stored as c = 1, s = m, z = 0, which is exact.
    """
    z, exact = _zero_point(d, -m)
    missed = np.flatnonzero(~exact)
    top = 15 * d[missed].astype(np.float64) + m[missed].astype(np.float64)
    z_mirror, hit = _zero_point(-d[missed], -top.astype(np.float32))
    hit &= top.astype(np.float32) == top  # 15d + m itself must be a float32
    mirror = missed[hit]
    q, d = q.copy(), d.copy()
    q[mirror] = np.uint8(15) - q[mirror]
    d[mirror] = -d[mirror]
    z[mirror] = z_mirror[hit]
    exact[mirror] = True
    flat = np.flatnonzero(~exact & (d == 0))
    q[flat], d[flat], z[flat] = 1, m[flat], 0  # a constant block: 1 * m - 0 * m == m
    exact[flat] = True
    return q, d, z, exact


def _zero_point(s: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 z with float32(z * s) == target, and where one was found.

    Searched among the float32 neighbours of target / s (products of nearby z land on the
    other side of target's rounding interval); a miss keeps target / s.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = np.where(s == 0, np.float32(0), target / s).astype(np.float32)
        exact = (z * s) == target
        left = np.flatnonzero(~exact)
        s_left, target_left = s[left], target[left]
        up = down = z[left]
        for _ in range(ZERO_POINT_WINDOW):
            if exact[left].all():
                break
            up = np.nextafter(up, np.float32(np.inf))
            down = np.nextafter(down, np.float32(-np.inf))
            for candidate in (up, down):
                hit = ~exact[left] & ((candidate * s_left) == target_left)
                z[left[hit]] = candidate[hit]
                exact[left[hit]] = True
    return z, exact


def _row_order(gguf_name: str, rows: int, heads: tuple[int, int] | None) -> np.ndarray | None:
    """transformers' reverse rotary permutation of attn_q / attn_k, as a row index, or None."""
    kind = gguf_name.split(".")[-2]
    if heads is None or kind not in ROTARY_PERMUTED:
        return None
    groups = heads[0] if kind == "attn_q" else heads[1]
    if rows % (2 * groups):
        raise ExportError(
            f"GGUF tensor {gguf_name} has {rows} rows, not a multiple of 2 x {groups} heads; "
            "the file's head counts do not match its weights"
        )
    # Within each head, file rows interleave the two rotary halves: (half_row, half) order.
    half = rows // groups // 2
    return np.arange(rows).reshape(groups, half, 2).swapaxes(1, 2).reshape(rows)


def _take_rows(quantized: BlockQuantized, rows: np.ndarray) -> BlockQuantized:
    return BlockQuantized(
        codes=quantized.codes[rows],
        scales=quantized.scales[rows],
        zero_points=quantized.zero_points[rows],
        bits=quantized.bits,
        block_size=quantized.block_size,
        source=quantized.source,
    )


def describe_carried(carried: GgufBlocks) -> str:
    """One line for the export log: what the GGUF's blocks became."""
    types: dict[str, int] = {}
    for block in carried.blocks.values():
        types[block.source] = types.get(block.source, 0) + 1
    for name in carried.requantized.values():
        types[f"{name} (requantized)"] = types.get(f"{name} (requantized)", 0) + 1
    text = ", ".join(f"{count} {kind}" for kind, count in sorted(types.items()))
    inexact = carried.inexact_total
    if inexact:
        text += f"; {inexact} Q4_1 blocks are within one float32 step of the file, not exact"
    return f"GGUF linear layers: {text}"
