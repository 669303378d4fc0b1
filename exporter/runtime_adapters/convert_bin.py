"""The one opt-in place that reads a pickled PEFT adapter (`adapter_model.bin`).

Only tensors are accepted (torch.load(weights_only=True) refuses other pickled objects);
the result is written next to it as `adapter_model.safetensors`, which every other command
then reads, so nothing else ever unpickles.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from peft_export.bundle.atomic import staged_file
from peft_export.exporter.adapter_source import PICKLE_FILE, WEIGHTS_FILE
from peft_export.exporter.errors import ExportError


def convert_bin_to_safetensors(peft_dir: str | Path) -> Path:
    import torch
    from safetensors.torch import save_file

    folder = Path(peft_dir)
    source = folder / PICKLE_FILE
    target = folder / WEIGHTS_FILE
    if not source.is_file():
        raise ExportError(f"{source} not found; pass the adapter folder that holds {PICKLE_FILE}")
    if target.exists():
        raise ExportError(f"{target} already exists; nothing to convert")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notes; the refusal below is the message
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError and others
        raise ExportError(
            f"{source} holds more than tensors ({type(exc).__name__}); it is refused: "
            "re-save the adapter with PEFT save_pretrained(safe_serialization=True)"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ExportError(f"{source} is not a name -> tensor mapping; re-save it with PEFT")
    with staged_file(target) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return target
