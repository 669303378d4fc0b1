"""A valid manifest and adapter file built by hand, for tests of the bundle layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from peft_export.bundle import names
from peft_export.bundle.manifest import (
    AdapterLayout,
    BaseModelInfo,
    GraphSpec,
    KVLayout,
    Manifest,
    ModuleSlot,
    TensorSpec,
)


def sample_manifest() -> Manifest:
    inputs = [
        TensorSpec(names.INPUT_IDS, "int64", ["batch", "seq"]),
        TensorSpec(names.ATTENTION_MASK, "int64", ["batch", "total"]),
        TensorSpec(names.POSITION_IDS, "int64", ["batch", "seq"]),
        TensorSpec(
            names.lora_input("model.layers.0.self_attn.q_proj", "A"), "float32", ["slots", 4, 8]
        ),
    ]
    outputs = [TensorSpec(names.LOGITS, "float32", ["batch", "seq", 16])]
    return Manifest(
        base_model=BaseModelInfo("tiny", "llama", {"model_type": "llama"}, "ab" * 32),
        mode="runtime",
        precision="fp32",
        opset=18,
        graph=GraphSpec(names.GRAPH, inputs, outputs),
        kv=KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32"),
        vocab_size=16,
        hidden_size=8,
        adapters=AdapterLayout(
            methods=["lora"],
            slots=4,
            r_max=4,
            modules=[ModuleSlot("model.layers.0.self_attn.q_proj", 8, 8, False)],
        ),
    )


def write_bundle(root: Path, manifest: Manifest | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / names.MANIFEST).write_text((manifest or sample_manifest()).to_json())
    return root


def write_adapter(path: Path, rank: int = 4) -> Path:
    rng = np.random.default_rng(0)
    tensors = {
        names.lora_input("model.layers.0.self_attn.q_proj", "A"): rng.standard_normal(
            (rank, 8)
        ).astype(np.float32),
        names.lora_input("model.layers.0.self_attn.q_proj", "B"): rng.standard_normal(
            (8, rank)
        ).astype(np.float32),
    }
    meta = {"format": names.ADAPTER_FILE_FORMAT, "version": "1", "method": "lora"}
    save_file(tensors, str(path), metadata=meta)
    return path


def manifest_dict() -> dict:
    return json.loads(sample_manifest().to_json())
