"""Names shared by the graph, the adapter files and the runtimes (docs/bundle-format.md)."""

MANIFEST = "manifest.json"
GRAPH = "model.onnx"
ADAPTERS_DIR = "adapters"
ENGINES_DIR = "engines"
REPORTS_DIR = "reports"
PARITY_REPORT = "reports/parity.json"
TOKENIZER = "tokenizer.json"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
PROMPT_EMBEDS = "prompt_embeds"
ADAPTER_IDS = "adapter_ids"
LOGITS = "logits"

LORA_PARTS = ("A", "B", "out_scale", "in_scale", "bias_scale")
ADAPTER_FILE_FORMAT = "peft-export-adapter"
ADAPTER_FILE_VERSION = "1"

MULTILORA_DOMAIN = "peft_export"
MULTILORA_OP = "MultiLoRA"
MULTILORA_VERSION = 1
MULTILORA_ADD_OP = "MultiLoRAAdd"
"""ONNX Runtime-only graphs (`--ort-fusions cpu`): `MultiLoRAAdd{n}` adds the deltas of n
modules that share an input to their base outputs in one node (docs/bundle-format.md)."""
MULTILORA_ADD_MAX_MODULES = 8
"""The CPU kernel library registers MultiLoRAAdd1..8 (plugins/multilora/multiLoRAOrtOp.cpp)."""


SLOT_SCALE_OP = "SlotScale"
"""y = x * scale[adapter_ids]: the DoRA/IA3 per-row scales of runtime bundles (same domain and
version as MultiLoRA; docs/bundle-format.md)."""


def multilora_add_op(modules: int) -> str:
    return f"{MULTILORA_ADD_OP}{modules}"


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


def lora_input(module_path: str, part: str) -> str:
    """Graph input (and adapter tensor) name of one bank of one target module."""
    if part not in LORA_PARTS:
        raise ValueError(f"unknown LoRA bank part {part!r}")
    return f"lora.{module_path}.{part}"


def split_lora_input(name: str) -> tuple[str, str] | None:
    """Inverse of `lora_input`: (module_path, part), or None for other names."""
    if not name.startswith("lora."):
        return None
    path, _, part = name[len("lora.") :].rpartition(".")
    return (path, part) if path and part in LORA_PARTS else None


def prefix_key(layer: int) -> str:
    return f"prefix.{layer}.key"


def prefix_value(layer: int) -> str:
    return f"prefix.{layer}.value"


ADAPTION_MASK = "adaption_mask"


def adaption_key(layer: int) -> str:
    """AdaptionPrompt keys of one layer: graph input [batch, kv_heads, adaption_len, head_dim]."""
    return f"adaption.{layer}.key"


def adaption_value(layer: int) -> str:
    return f"adaption.{layer}.value"


def adaption_gate(layer: int) -> str:
    """AdaptionPrompt gate of one layer: graph input [batch], adapter file tensor [1]."""
    return f"adaption.{layer}.gate"


def adapter_file(name: str) -> str:
    return f"{ADAPTERS_DIR}/{name}.safetensors"


REFIT_DIR = f"{ENGINES_DIR}/refit"
REFIT_BASE = "base"
"""Refit set holding the base value of every weight any other set (or the export) changes."""

BASE_TARGETS = "_base_targets"
"""adapters/_base_targets.safetensors: base weights of the bank modules, for DoRA's norms."""
ADAPTION_BASE = "_adaption_base"
"""adapters/_adaption_base.safetensors: the projections AdaptionPrompt adapters need."""
ENCODER_HEADS = "_base_heads"
"""adapters/_base_heads.safetensors: encoder bundles' slot-0 head banks (the base's own head)."""
HEAD_PREFIX = "head."
RESERVED_PREFIX = "_"
"""Adapter names starting with this belong to the bundle's own side files."""
RESERVED_NAMES = (REFIT_BASE, BASE_TARGETS, ADAPTION_BASE, ENCODER_HEADS)
"""Every file stem the bundle writes next to adapter files (adapters/, engines/refit/)."""

NO_ADAPTER = "-"
"""How a command line spells "no adapter, the base model" for one row (`run --adapter -`,
`peft-generate --adapter -`): not a valid adapter name, so it never means an installed one."""


def reserved_adapter_name(name: str) -> bool:
    """True for names an adapter must not take, since its file would replace the bundle's own.

    Compared case-insensitively: on a case-insensitive file system `Base` is `base`'s file.
    """
    folded = name.casefold()
    return folded.startswith(RESERVED_PREFIX) or folded in {n.casefold() for n in RESERVED_NAMES}


def refit_file(name: str) -> str:
    """Merged bundles: the refit set of adapter `name` (or REFIT_BASE)."""
    return f"{REFIT_DIR}/{name}.safetensors"


def head_input(leaf_path: str, param: str) -> str:
    """Graph input (and adapter tensor) name of one head bank: `head.classifier.weight`."""
    return f"{HEAD_PREFIX}{leaf_path}.{param}"


def split_head_input(name: str) -> tuple[str, str] | None:
    """Inverse of `head_input`: (leaf_path, param), or None for other names."""
    if not name.startswith(HEAD_PREFIX):
        return None
    path, _, param = name[len(HEAD_PREFIX) :].rpartition(".")
    return (path, param) if path and param else None
