"""The pieces of a bundle besides the graph: base hash, tokenizer files, producer, manifest.

All writes go into a staging folder owned by the caller (peft_export.bundle.atomic), so
these functions never leave anything half-written at the bundle's final path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_export import __version__
from peft_export.bundle import atomic, names
from peft_export.bundle.manifest import (
    AdapterLayout,
    BaseModelInfo,
    GraphSpec,
    KVLayout,
    Manifest,
    TokenizerInfo,
)
from peft_export.exporter.errors import ExportError
from peft_export.models.architectures import ArchSpec

TOKENIZER_FILES = (
    names.TOKENIZER,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
_PRODUCER_PACKAGES = ("torch", "transformers", "peft", "onnx", "onnxruntime", "onnxscript")
_TORCH_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weights_sha256(model: nn.Module) -> str:
    """Hash of the base weights as docs/bundle-format.md defines it.

    Over the state dict in sorted-name order, each tensor as its name, its dtype name (as
    loaded, e.g. "float32"), its shape ("64,128") and its values as fp32 little-endian bytes,
    the three text fields each followed by a NUL byte. Call it on the base before merging.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = ",".join(str(d) for d in tensor.shape)
        for text in (name, dtype, shape):
            digest.update(text.encode("utf-8") + b"\0")
        digest.update(tensor.to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def producer_versions() -> dict[str, str]:
    versions = {"peft_export": __version__}
    for package in _PRODUCER_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The HF config as plain JSON (dtype objects and the like become strings)."""
    return json.loads(model.config.to_json_string(use_diff=False))


def copy_tokenizer(tokenizer_dir: str | Path | None, stage: Path) -> list[str]:
    """Copy the tokenizer files the runtime needs (no transformers there); names copied."""
    if tokenizer_dir is None:
        return []
    source = Path(tokenizer_dir)
    copied = []
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copyfile(source / file, stage / file)
            copied.append(file)
    return copied


def tokenizer_info(stage: Path, model: nn.Module) -> TokenizerInfo:
    """Special ids and chat template, read from the copied files (config ids as fallback)."""
    config = _read_json(stage / "tokenizer_config.json")
    special_map = _read_json(stage / "special_tokens_map.json")
    vocab = _token_ids(stage / names.TOKENIZER)
    template = config.get("chat_template")
    if (stage / "chat_template.jinja").is_file():
        template = (stage / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)

    def special(key: str) -> int | None:
        token = config.get(key) or special_map.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return vocab.get(token) if isinstance(token, str) else None

    model_config = model.config
    generation = getattr(model, "generation_config", None)
    bos = special("bos_token")
    if bos is None:
        bos = _first_id(getattr(model_config, "bos_token_id", None))
    eos_ids = _ids(special("eos_token"))
    for source in (getattr(generation, "eos_token_id", None), model_config.eos_token_id):
        eos_ids += [i for i in _ids(source) if i not in eos_ids]
    pad = special("pad_token")
    if pad is None:
        pad = _first_id(getattr(model_config, "pad_token_id", None))
    if pad is None and eos_ids:
        pad = eos_ids[0]
    return TokenizerInfo(
        file=names.TOKENIZER if (stage / names.TOKENIZER).is_file() else None,
        chat_template=template if isinstance(template, str) else None,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
    )


def build_manifest(
    *,
    model: nn.Module,
    spec: ArchSpec,
    source: str,
    base_sha256: str,
    mode: str,
    precision: str,
    opset: int,
    graph: GraphSpec,
    adapters: AdapterLayout,
    tokenizer: TokenizerInfo,
) -> Manifest:
    config = model.config
    return Manifest(
        base_model=BaseModelInfo(
            source=source,
            architecture=spec.model_type,
            config=model_config_dict(model),
            weights_sha256=base_sha256,
        ),
        mode=mode,
        precision=precision,
        opset=opset,
        graph=graph,
        kv=KVLayout(
            num_layers=spec.num_layers(config),
            num_kv_heads=spec.num_kv_heads(config),
            head_dim=spec.head_dim(config),
            dtype=_TORCH_DTYPE_NAMES[PRECISION_DTYPES[precision]],
        ),
        vocab_size=spec.vocab_size(config),
        hidden_size=spec.hidden_size(config),
        adapters=adapters,
        tokenizer=tokenizer,
        generation={"max_position_embeddings": spec.max_positions(config)},
        producer=producer_versions(),
    )


def write_manifest(stage: Path, manifest: Manifest) -> None:
    """Validate by a round trip through the strict parser, then write manifest.json."""
    Manifest.from_dict(json.loads(manifest.to_json()))
    atomic.write_text(stage / names.MANIFEST, manifest.to_json())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path.name} of the base tokenizer is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _token_ids(tokenizer_json: Path) -> dict[str, int]:
    if not tokenizer_json.is_file():
        return {}
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True)
    except Exception as exc:
        raise ExportError(
            f"{tokenizer_json.name} of the base cannot be read by `tokenizers` ({exc}); "
            "re-save the tokenizer with a current transformers"
        ) from None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _first_id(value: Any) -> int | None:
    ids = _ids(value)
    return ids[0] if ids else None
