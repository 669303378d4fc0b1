"""Prompt-side adapters in a bundle: install at export, and `adapters add` without re-export.

Prefix, prompt and P-tuning adapters convert from the manifest alone. AdaptionPrompt needs
the k/v projection weights of every layer, so a bundle that accepts it keeps them in
`adapters/_adaption_base.safetensors` (fp32), as the LoRA family keeps DoRA's base targets.
Every check runs before the first write, and writes are staged, so a refused adapter leaves
the bundle untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from torch import nn

from peft_export.bundle import names, safetensors_io
from peft_export.bundle.atomic import staged_file, staged_update, write_text
from peft_export.bundle.errors import BundleError
from peft_export.bundle.manifest import AdapterLayout, InstalledAdapter, Manifest
from peft_export.bundle.paths import confined
from peft_export.exporter.adapter_source import check_new_adapter_name, read_adapter
from peft_export.exporter.bundle_files import read_manifest
from peft_export.exporter.errors import ExportError
from peft_export.exporter.prompt_adapters.adapter_file import write_prompt_adapter
from peft_export.exporter.prompt_adapters.convert import (
    ADAPTION_PROMPT,
    PROMPT_METHODS,
    PromptAdapter,
    convert_prompt_adapter,
)
from peft_export.exporter.prompt_adapters.target import PromptTarget

ADAPTION_BASE_FILE = names.adapter_file(names.ADAPTION_BASE)
_KV_PROJECTIONS = (".self_attn.k_proj.", ".self_attn.v_proj.", ".attn.c_attn.")
"""Parameters holding each layer's key/value projections (Llama family; GPT-2's fused QKV)."""


def adaption_base_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The base's key/value projection weights and biases, as fp32 numpy."""
    return {
        name: param.detach().float().cpu().numpy()
        for name, param in model.named_parameters()
        if any(part in name for part in _KV_PROJECTIONS)
    }


def write_adaption_base(bundle_dir: Path, weights: dict[str, np.ndarray]) -> None:
    path = confined(bundle_dir, ADAPTION_BASE_FILE, lexical_only=True)
    with staged_file(path) as tmp:
        save_file(weights, str(tmp), metadata={"format": "peft-export-adaption-base"})


def read_adaption_base(bundle_dir: Path) -> dict[str, np.ndarray]:
    path = confined(bundle_dir, ADAPTION_BASE_FILE)
    if not path.is_file():
        raise ExportError(
            f"{path} is missing, so AdaptionPrompt adapters cannot be converted for this "
            "bundle; re-export it with --adaption-max-len"
        )
    try:
        return safetensors_io.read_tensors(path)
    except BundleError as exc:
        raise ExportError(f"{exc}; re-export the bundle") from None


def install_prompt_adapter(
    bundle_dir: Path,
    layout: AdapterLayout,
    adapter: PromptAdapter,
    target: PromptTarget,
    *,
    precision: str,
) -> InstalledAdapter:
    """Write one converted adapter into a (staged or live) bundle folder and record it."""
    relative = names.adapter_file(adapter.name)
    digest = write_prompt_adapter(
        adapter, confined(bundle_dir, relative, lexical_only=True), target, precision
    )
    entry = InstalledAdapter(file=relative, method=adapter.method, rank=0, sha256=digest)
    layout.installed[adapter.name] = entry
    if adapter.method not in layout.methods:  # CPT added to a bundle exported before it
        layout.methods.append(adapter.method)
    return entry


def add_prompt_adapter(
    bundle_dir: str | Path, name: str, peft_dir: str | Path, *, replace: bool = False
) -> InstalledAdapter:
    """Convert a PEFT prompt-side folder for an exported runtime bundle, in seconds.

    The bundle changes as one step (peft_export.bundle.atomic.staged_update).
    """
    root = Path(bundle_dir)
    _load_runtime_manifest(root)
    with staged_update(root) as stage:
        manifest = _load_runtime_manifest(root)
        check_new_adapter_name(name, manifest.adapters.installed, replace=replace)
        source = read_adapter(peft_dir, name=name)
        if source.method not in PROMPT_METHODS:
            raise ExportError(
                f"adapter {name} is {source.method}, not a prompt-side method "
                f"({', '.join(PROMPT_METHODS)})"
            )
        target = PromptTarget.from_manifest(manifest)
        weights = read_adaption_base(root) if source.method == ADAPTION_PROMPT else None
        adapter = convert_prompt_adapter(source, target, name=name, base_weights=weights)
        entry = install_prompt_adapter(
            stage, manifest.adapters, adapter, target, precision=manifest.precision
        )
        write_text(stage / names.MANIFEST, manifest.to_json())
    return entry


def _load_runtime_manifest(root: Path) -> Manifest:
    manifest = read_manifest(root)
    if manifest.mode != "runtime":
        raise ExportError(
            f"{root} is a {manifest.mode}-mode bundle; export it with --mode runtime (and "
            "--prefix-max-len / --prompt-max-len / --adaption-max-len) to add adapters"
        )
    return manifest
