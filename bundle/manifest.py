"""manifest.json: schema, strict parsing and writing.

Parsing is driven by the dataclass type hints so that every field is checked once, with
an error that names the field; a bundle from a newer schema is refused with the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from peft_export.bundle import names
from peft_export.bundle.atomic import previous_path
from peft_export.bundle.errors import BundleError
from peft_export.bundle.json_limits import load_json
from peft_export.bundle.paths import check_links, confined

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

Mode = Literal["merged", "runtime"]
Precision = Literal["fp32", "fp16", "bf16"]
MODES: tuple[str, ...] = typing.get_args(Mode)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
"""What `export --mode/--precision` accept: exactly what a manifest may record."""
Dim = int | str


@dataclasses.dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[Dim]


@dataclasses.dataclass
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ort_fusions: str | None = None
    """Set ("cpu") when the graph holds ONNX Runtime contrib ops: ONNX Runtime only."""

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclasses.dataclass
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str


@dataclasses.dataclass
class ModuleSlot:
    path: str
    in_features: int
    out_features: int
    has_bias: bool = False


@dataclasses.dataclass
class InstalledAdapter:
    file: str
    method: str
    rank: int = 0
    sha256: str = ""
    vocab_size: int = 0
    """Vocabulary the adapter was trained with when it adds tokens (0: the base's)."""
    alora_invocation_tokens: list[int] = dataclasses.field(default_factory=list)
    """Activated LoRA: the token sequence from which its delta applies (empty: always)."""


@dataclasses.dataclass
class TokenLayout:
    """Trainable-token and retrained-head banks of a runtime graph (bundle/token_inputs.py)."""

    base_vocab: int
    """The base model's vocabulary; the graph's (`vocab_size`) adds `extra_tokens` rows."""
    extra_tokens: int
    embed_rows: int
    head_rank: int
    embed_path: str
    head_path: str


@dataclasses.dataclass
class BottleneckSite:
    """One place a bottleneck adapter attaches: a layer and the library's location key."""

    layer: int
    location: str


@dataclasses.dataclass
class BottleneckLayout:
    """Bottleneck banks of a runtime graph (bundle/bottleneck.py): their sites, the largest
    bottleneck width they hold and the non-linearities the graph computes, in `act` order."""

    hidden: int
    size: int
    activations: list[str]
    sites: list[BottleneckSite]


@dataclasses.dataclass
class AdapterLayout:
    methods: list[str] = dataclasses.field(default_factory=list)
    slots: int = 0
    r_max: int = 0
    modules: list[ModuleSlot] = dataclasses.field(default_factory=list)
    prefix_max_len: int = 0
    prompt_max_len: int = 0
    adaption_max_len: int = 0
    tokens: TokenLayout | None = None
    alora: bool = False
    """The graph has `alora_start`: activated-LoRA adapters are served."""
    merged: dict[str, Any] | None = None
    bottleneck: BottleneckLayout | None = None
    installed: dict[str, InstalledAdapter] = dataclasses.field(default_factory=dict)

    def module(self, path: str) -> ModuleSlot | None:
        return next((m for m in self.modules if m.path == path), None)


@dataclasses.dataclass
class TokenizerInfo:
    file: str | None = names.TOKENIZER
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = dataclasses.field(default_factory=list)
    pad_token_id: int | None = None


@dataclasses.dataclass
class EngineRecord:
    file: str
    backend: str
    version: str
    precision: str
    profiles: list[dict[str, list[int]]]
    compute_capability: str | None = None
    refittable: bool = False
    lora_impl: str = "onnx"
    onnx_sha256: str = ""


@dataclasses.dataclass
class QuantizedModule:
    """One quantized linear layer: where its values came from and its graph tensors."""

    source: str
    """"rtn" (ONNX Runtime's quantizer, at export) or "gguf:Q4_0" and the like (carried)."""
    bits: int
    """4 or 8: a layer carried from a GGUF keeps its own width."""
    weight: str
    scales: str
    zero_points: str = ""
    """Empty: the format's default zero point (2**(bits-1)); symmetric quantization."""
    rows: list[int] = dataclasses.field(default_factory=list)
    """[start, stop): the layer's output rows within `weight` and `scales` when one
    MatMulNBits computes several layers that read the same input (q/k/v, gate/up); empty:
    the tensors are the layer's own."""


@dataclasses.dataclass
class Quantization:
    """Weight-only block quantization of the base's linear layers (adapters stay float)."""

    bits: int
    """Width of the layers quantized at export (carried layers keep their own)."""
    block_size: int
    format: Literal["matmulnbits", "qdq"]
    accuracy_level: int = 0
    modules: dict[str, QuantizedModule] = dataclasses.field(default_factory=dict)
    embedding: dict[str, QuantizedModule] = dataclasses.field(default_factory=dict)
    """The token table when quantized too (GatherBlockQuantized; ONNX Runtime-only graphs)."""
    kept: dict[str, str] = dataclasses.field(default_factory=dict)
    """Linear layers left at full precision, and why (--quant-skip, shape)."""


@dataclasses.dataclass
class EncoderInfo:
    """Encoder bundles (docs/bundle-format.md "Encoder bundles"): the task the graph computes
    and what the runtime needs to turn its outputs into labels, spans or vectors."""

    task: str
    """sequence-classification, token-classification, question-answering, feature-extraction."""
    outputs: list[str]
    token_type_ids: bool = False
    max_length: int = 512
    """Longest input in tokens (the model's position table; prompt tokens included)."""
    pooling: dict[str, Any] = dataclasses.field(default_factory=dict)
    """feature-extraction: {"mode": "mean"|"cls"|"max", "normalize": bool}."""
    max_labels: int = 0
    """Labelled tasks: the last dim of the logits; a head with fewer labels is zero-padded."""
    labels: list[str] = dataclasses.field(default_factory=list)
    """The base head's labels (merged: the merged adapter's), in id order."""
    base_head: bool = True
    """False when the base checkpoint has no trained head: rows need an adapter's head."""
    heads: list[str] = dataclasses.field(default_factory=list)
    """Runtime mode: the head-bank graph inputs (`head.PATH.PARAM`), filled per slot."""


@dataclasses.dataclass
class BaseModelInfo:
    source: str
    architecture: str
    config: dict[str, Any]
    weights_sha256: str


@dataclasses.dataclass
class Manifest:
    base_model: BaseModelInfo
    mode: Mode
    precision: Precision
    opset: int
    graph: GraphSpec
    kv: KVLayout
    vocab_size: int
    hidden_size: int
    adapters: AdapterLayout = dataclasses.field(default_factory=AdapterLayout)
    tokenizer: TokenizerInfo = dataclasses.field(default_factory=TokenizerInfo)
    generation: dict[str, Any] = dataclasses.field(default_factory=dict)
    engines: list[EngineRecord] = dataclasses.field(default_factory=list)
    producer: dict[str, str] = dataclasses.field(default_factory=dict)
    quantization: Quantization | None = None
    encoder: EncoderInfo | None = None
    """Set for encoder bundles (no KV cache, no generation)."""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise BundleError("manifest.json: top level must be an object; re-export the bundle")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError("manifest.json: schema_version missing or not an integer; re-export")
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"manifest.json: schema_version {version} is newer than this peft-export "
                f"understands ({SCHEMA_VERSION}); upgrade peft-export"
            )
        if version < 1:
            raise BundleError(f"manifest.json: schema_version {version} is invalid; re-export")
        try:
            manifest = _parse(cls, data, "manifest")
        except BundleError as exc:
            if "re-export" in str(exc):
                raise
            raise BundleError(f"{exc}; the bundle is damaged: re-export it") from None
        _check_paths(manifest)
        return manifest


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate `bundle_dir/manifest.json`."""
    root = Path(bundle_dir)
    if not root.is_dir():
        previous = previous_path(root.absolute())
        if previous.is_dir():
            raise BundleError(
                f"{root} is missing but {previous.name} is there: a write is swapping it in, "
                f"or was killed doing so; retry, or move {previous.name} back to {root.name}"
            )
        raise BundleError(f"{root}: not a bundle directory; pass the folder written by 'export'")
    path = confined(root, names.MANIFEST)
    if not path.is_file():
        raise BundleError(f"{root}: no manifest.json; is this a peft-export bundle?")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
    check_links(root)
    data = load_json(path.read_bytes(), where=str(path), fix="re-export the bundle")
    return Manifest.from_dict(data)


def _check_paths(manifest: Manifest) -> None:
    files = [manifest.graph.file]
    files += [a.file for a in manifest.adapters.installed.values()]
    files += [e.file for e in manifest.engines]
    if manifest.tokenizer.file:
        files.append(manifest.tokenizer.file)
    for file in files:
        confined(Path("/bundle"), file, lexical_only=True)


def _parse(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where)
    if origin is typing.Union or origin is types.UnionType:
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _parse(option, value, where)
            except BundleError:
                continue
        raise BundleError(f"manifest.json: {where} has an unexpected value {value!r:.60}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(map(str, typing.get_args(tp)))
            raise BundleError(f"manifest.json: {where} is {value!r:.40}, expected one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise BundleError(f"manifest.json: {where} must be a list")
        (item,) = typing.get_args(tp)
        return [_parse(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"manifest.json: {where} must be an object")
        _, item = typing.get_args(tp)
        return {str(k): _parse(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BundleError(f"manifest.json: {where} must be an integer")
        if value < 0:
            raise BundleError(f"manifest.json: {where} must not be negative")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise BundleError(f"manifest.json: {where} must be true or false")
        return value
    if tp in (str, float):
        if not isinstance(value, tp) and not (tp is float and isinstance(value, int)):
            raise BundleError(f"manifest.json: {where} must be a {tp.__name__}")
        return value
    raise TypeError(f"unsupported manifest field type {tp!r}")


@functools.cache
def _type_hints(cls: Any) -> dict[str, Any]:
    """typing.get_type_hints, once per class: it re-evaluates every annotation per call (most of
    a manifest's ~70 ms load time)."""
    return typing.get_type_hints(cls)


def _parse_dataclass(cls: Any, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise BundleError(f"manifest.json: {where} must be an object")
    hints = _type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        at = f"{where}.{field.name}"
        if field.name in value:
            kwargs[field.name] = _parse(hints[field.name], value[field.name], at)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise BundleError(f"manifest.json: {at} is missing; re-export the bundle")
    return cls(**kwargs)
