"""Write a converted prompt-side adapter as `adapters/NAME.safetensors` (atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from peft_export.bundle import names
from peft_export.bundle.atomic import staged_file
from peft_export.exporter.adapter_source import cast_finite
from peft_export.exporter.bundle_files import file_sha256
from peft_export.exporter.prompt_adapters.convert import PromptAdapter
from peft_export.exporter.prompt_adapters.target import PromptTarget

_PRECISION_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def adapter_metadata(adapter: PromptAdapter, target: PromptTarget) -> dict[str, str]:
    return {
        "format": names.ADAPTER_FILE_FORMAT,
        "version": names.ADAPTER_FILE_VERSION,
        "method": adapter.method,
        "name": adapter.name,
        "base_weights_sha256": target.weights_sha256,
        "rank": "0",
        "length": str(adapter.length),
        "source": adapter.source,
    }


def write_prompt_adapter(
    adapter: PromptAdapter, path: str | Path, target: PromptTarget, precision: str = "fp32"
) -> str:
    """Write the adapter's tensors in the graph's dtype and return the file's sha256.

    numpy has no bfloat16, so bf16 bundles keep fp32 files and the runtime casts on load.
    """
    dtype = _PRECISION_DTYPES.get(precision, np.float32)
    why = f"|x| > {float(np.finfo(dtype).max):.6g}"
    tensors = cast_finite(
        adapter.name, adapter.tensors, precision, dtype, why=why, fix="serve it from an fp32 bundle"
    )
    with staged_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=adapter_metadata(adapter, target))
        digest = file_sha256(tmp)
    return digest
