"""Export an encoder (BERT family) with PEFT adapters: merged, or as runtime inputs.

merged: one adapter folded into the weights by PEFT, its trained head (`modules_to_save`)
included; the head keeps the adapter's own label count. runtime: LoRA-family deltas become
the same bank inputs decoders use (exporter/runtime_adapters), trained heads become head
banks (exporter/encoders/heads.py), and every adapter's labels are written into its file's
header, so one graph serves many tasks' heads and label sets in one batch.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from safetensors.numpy import save_file

from peft_export.bundle import names
from peft_export.bundle.atomic import staged_dir, staged_file
from peft_export.bundle.errors import BundleError
from peft_export.bundle.lora_methods import LORA_METHODS
from peft_export.bundle.manifest import MODES, AdapterLayout, EncoderInfo, Manifest
from peft_export.bundle.paths import confined
from peft_export.exporter import bundle_writer
from peft_export.exporter.adapter_source import (
    METHODS,
    check_fits,
    parse_adapter_arg,
    read_adapter,
)
from peft_export.exporter.encoders.base import (
    checkpoint_model_type,
    infer_task,
    load_task_model,
    read_labels,
    read_pooling,
)
from peft_export.exporter.encoders.bottleneck import (
    is_bottleneck,
    plan_bottleneck,
    with_library_head,
)
from peft_export.exporter.encoders.fusions import fuse_encoder_graph
from peft_export.exporter.encoders.heads import (
    HeadBanks,
    SplitAdapter,
    bank_shapes,
    head_leaves,
    label_count,
    slot_heads,
    split_heads,
)
from peft_export.exporter.encoders.wrapper import EncoderWrapper
from peft_export.exporter.errors import ExportError
from peft_export.exporter.graph.extension import GraphExtension
from peft_export.exporter.graph.onnx_export import OPSET, export_onnx
from peft_export.exporter.merge import check_mergeable, merge_adapter
from peft_export.exporter.prompt_adapters.prompt_embeds import PromptEmbedsExtension
from peft_export.exporter.runtime_adapters.banks import LoraBanks
from peft_export.exporter.runtime_adapters.bundle_adapters import install_converted, plan_layout
from peft_export.exporter.runtime_adapters.convert import SlotTensors
from peft_export.models.encoders import EncoderSpec, TaskSpec, get_encoder, get_task

DEFAULT_SLOTS = 8
PROMPT_EMBEDS_METHODS = ("prompt_tuning", "p_tuning")
LABELS_METADATA = "labels"
"""Adapter file header entry: the adapter's labels in id order (a JSON list)."""


def encoder_checkpoint(source: str | Path) -> Path | None:
    """The checkpoint folder of `source` when it is an encoder base, else None."""
    from peft_export.exporter.base_model import resolve_checkpoint
    from peft_export.models.base_models import KNOWN_BASES
    from peft_export.models.encoders import is_encoder

    text = str(source)
    known = KNOWN_BASES.get(text)
    if known is not None and not known.archive:
        return None
    path = Path(text).expanduser()
    if known is None and not (path.is_dir() and (path / "config.json").is_file()):
        return None
    if known is None and not is_encoder(checkpoint_model_type(path) or ""):
        return None
    return resolve_checkpoint(text)


def export_encoder(
    base: str | Path,
    adapters: Sequence[tuple[str | None, str | Path] | str] = (),
    *,
    out: str | Path,
    mode: str = "merged",
    task: str | None = None,
    method: str | None = None,
    precision: str = "fp32",
    options: dict[str, Any] | None = None,
    force: bool = False,
    external_data: bool | None = None,
    opset: int = OPSET,
    console: Console | None = None,
) -> Manifest:
    """Export the encoder checkpoint `base` (folder or known short name) with `adapters`.

    `options`: the runtime LoRA-bank options (`target_modules`, `max_rank`, `slots`,
    `methods`), as for decoders."""
    from peft_export.exporter.pipeline import check_out_dir

    console = console or Console(stderr=True, quiet=True)
    options = dict(options or {})
    if mode not in MODES:
        raise ExportError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if precision != "fp32":
        raise ExportError("encoder bundles are exported in fp32; drop --precision")
    if method is not None and method not in METHODS:
        raise ExportError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    check_out_dir(Path(out), force)
    folder = encoder_checkpoint(base)
    if folder is None:
        raise ExportError(f"{base} is not an encoder checkpoint; pass a BERT-family model folder")
    spec = get_encoder(checkpoint_model_type(folder) or "")
    pairs = [parse_adapter_arg(a) if isinstance(a, str) else a for a in adapters]
    sources = [read_adapter(path, name=name, method=method) for name, path in pairs]
    if len({s.name for s in sources}) != len(sources):
        raise ExportError("two adapters have the same name; name them apart with NAME=DIR")
    if mode == "merged" and len(sources) > 1:
        raise ExportError(
            f"merged mode folds one adapter into the weights, got {len(sources)}; "
            "export one bundle per adapter or use --mode runtime"
        )
    task_spec = get_task(infer_task(folder, [s.config.get("task_type") for s in sources], task))
    split = [split_heads(s) for s in sources]
    label_head = spec.label_head(task_spec.name) if task_spec.labelled else None
    if mode == "merged":
        plan = _merged(folder, spec, task_spec, split, label_head, console)
    else:
        plan = _runtime(folder, spec, task_spec, split, label_head, options)
    model, extensions, info, layout, writers, base_sha = plan
    info.pooling = read_pooling(folder) if task_spec.name == "feature-extraction" else {}
    info.max_length = _max_length(folder, spec, model)
    wrapper = EncoderWrapper(
        model, spec, task_spec, extensions, pooling=info.pooling, labels=info.max_labels
    )
    try:
        with staged_dir(out, overwrite=force) as stage:
            graph = export_onnx(
                wrapper,
                stage / names.GRAPH,
                external_data=external_data,
                opset=opset,
                console=console,
            )
            for extension in extensions:
                extension.describe(layout)
            for write in writers:
                write(stage, layout)
            bundle_writer.copy_tokenizer(folder, stage)
            manifest = bundle_writer.build_manifest(
                model=model,
                spec=spec,
                source=str(base),
                base_sha256=base_sha,
                mode=mode,
                precision=precision,
                opset=opset,
                graph=graph,
                adapters=layout,
                tokenizer=bundle_writer.tokenizer_info(stage, model),
            )
            manifest.encoder = info
            fuse_encoder_graph(stage, manifest, options.get("ort_fusions", "none"))
            bundle_writer.write_manifest(stage, manifest)
    except BundleError as exc:
        raise ExportError(str(exc)) from None
    console.log(f"bundle written to {out}")
    return manifest


_Plan = tuple[Any, list[GraphExtension], EncoderInfo, AdapterLayout, list[Callable], str]
"""The traced model, its extensions, the manifest's encoder info, the adapter layout, the
writers of adapter files and the base weights' hash."""


def _merged(
    folder: Path,
    spec: EncoderSpec,
    task_spec: TaskSpec,
    split: list[SplitAdapter],
    label_head: str | None,
    console: Console,
) -> _Plan:
    adapter = split[0] if split else None
    own_head = (
        adapter is not None and label_head is not None and (f"{label_head}.weight" in adapter.heads)
    )
    num_labels = label_count(None, adapter, label_head) if own_head else None
    model, trained = load_task_model(folder, task_spec.name, num_labels=num_labels)
    base_sha = bundle_writer.weights_sha256(model)
    layout = AdapterLayout()
    labels = _base_labels(model, label_head)
    if adapter is not None:
        check_mergeable(adapter.source)
        check_fits(adapter.deltas, model)
        with console.status(f"merging adapter {adapter.source.name} ({adapter.source.method})"):
            model = merge_adapter(copy.deepcopy(model), adapter.source)
        layout.merged = {
            "name": adapter.source.name,
            "method": adapter.source.method,
            "source": str(adapter.source.path),
        }
        if own_head:
            labels = read_labels(adapter.source.path, num_labels)
            trained = True
    info = EncoderInfo(
        task=task_spec.name,
        outputs=list(task_spec.outputs),
        token_type_ids=spec.token_type_ids,
        max_labels=len(labels),
        labels=labels,
        base_head=trained,
    )
    return model.eval(), [], info, layout, [], base_sha


def _runtime(
    folder: Path,
    spec: EncoderSpec,
    task_spec: TaskSpec,
    split: list[SplitAdapter],
    label_head: str | None,
    options: dict[str, Any],
) -> _Plan:
    model, trained = load_task_model(folder, task_spec.name)
    base_sha = bundle_writer.weights_sha256(model)
    if label_head is not None:
        split = [with_library_head(s, model) if is_bottleneck(s.source) else s for s in split]
    bottleneck = [s.source for s in split if is_bottleneck(s.source)]
    split_rest = [s for s in split if not is_bottleneck(s.source)]
    prompts = _prompt_tensors(split_rest, task_spec.name)
    for adapter in split_rest:
        check_fits(adapter.deltas, model)
    lora = [s for s in split if s.source.method in LORA_METHODS]
    extensions: list[GraphExtension] = []
    converted: list[SlotTensors] = []
    methods = options.get("methods")
    if lora or methods:
        layout, parts, converted = plan_layout(
            model,
            [s.deltas for s in lora],
            target_modules=_listed(options.get("target_modules")),
            max_rank=options.get("max_rank"),
            slots=int(options.get("slots") or DEFAULT_SLOTS),
            methods=_listed(methods),
        )
        extensions.append(
            LoraBanks(
                layout.modules,
                r_max=layout.r_max,
                slots=layout.slots,
                methods=layout.methods,
                parts=parts,
            )
        )
    else:
        layout = AdapterLayout(slots=int(options.get("slots") or DEFAULT_SLOTS))
    banks, fitted = plan_bottleneck(model, spec, bottleneck, options, layout.slots)
    if banks is not None:
        extensions.append(banks)
        converted += fitted
    by_source = {s.source.name: s.source for s in split}
    params = sorted({p for s in split for p in s.heads})
    leaves = head_leaves(model, params, label_head) if params or label_head else []
    shapes = bank_shapes(model, leaves, split, label_head) if leaves else {}
    if shapes:
        extensions.append(HeadBanks(shapes, declare_ids=not lora and not methods and not banks))
    if prompts:
        hidden = spec.hidden_size(model.config)
        longest = max(len(p) for p in prompts.values())
        extensions.append(PromptEmbedsExtension(hidden, longest, methods=PROMPT_EMBEDS_METHODS))
    converted += [
        SlotTensors(
            name, by_source[name].method, 0, str(by_source[name].path), {names.PROMPT_EMBEDS: value}
        )
        for name, value in prompts.items()
    ]
    labels = {
        s.source.name: read_labels(s.source.path, label_count(model, s, label_head))
        if label_head and f"{label_head}.weight" in s.heads
        else _base_labels(model, label_head)
        for s in split
    }
    base_labels = _base_labels(model, label_head)
    max_labels = max([len(base_labels), *(len(v) for v in labels.values())])
    by_name = {s.source.name: s for s in split}

    def write(stage: Path, manifest_layout: AdapterLayout) -> None:
        manifest_layout.slots = manifest_layout.slots or layout.slots
        if shapes:
            _write_base_heads(stage, slot_heads(model, shapes, None))
        for adapter in converted:
            adapter.tensors.update(slot_heads(model, shapes, by_name[adapter.name]))
            install_converted(
                stage,
                manifest_layout,
                adapter,
                weights_sha256=base_sha,
                precision="fp32",
                metadata={LABELS_METADATA: json.dumps(labels[adapter.name])},
            )

    info = EncoderInfo(
        task=task_spec.name,
        outputs=list(task_spec.outputs),
        token_type_ids=spec.token_type_ids,
        max_labels=max_labels if label_head else 0,
        labels=base_labels,
        base_head=trained,
        heads=sorted(shapes),
    )
    return model, extensions, info, AdapterLayout(), [write], base_sha


def _prompt_tensors(split: list[SplitAdapter], task: str) -> dict[str, np.ndarray]:
    """Prompt tuning / P-tuning adapters' virtual token embeddings [n_virtual, hidden] (PEFT
    saves P-tuning's encoder output); other prompt-side methods are refused."""
    prompts = {}
    for adapter in split:
        source = adapter.source
        if source.method in LORA_METHODS:
            continue
        if source.method == "prefix_tuning":
            raise ExportError(
                f"adapter {source.name} is prefix tuning, which PEFT cannot apply to encoders "
                "with this transformers (their layers take no past key values); use prompt "
                "tuning or LoRA"
            )
        if source.method not in PROMPT_EMBEDS_METHODS:
            raise ExportError(
                f"adapter {source.name} is {source.method}; encoder bundles serve "
                f"{', '.join(LORA_METHODS + PROMPT_EMBEDS_METHODS)}"
            )
        if task != "sequence-classification":
            raise ExportError(
                f"adapter {source.name} is {source.method}: encoder bundles take prompt adapters "
                "for sequence classification only (PEFT returns the virtual tokens' outputs for "
                "the other tasks)"
            )
        prompts[source.name] = np.asarray(
            source.load_tensors()["prompt_embeddings"], dtype=np.float32
        )
    return prompts


def _write_base_heads(stage: Path, tensors: dict[str, np.ndarray]) -> None:
    path = confined(stage, names.adapter_file(names.ENCODER_HEADS), lexical_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "peft-export-base-heads"})


def _base_labels(model: Any, label_head: str | None) -> list[str]:
    if label_head is None:
        return []
    count = int(model.get_submodule(label_head).weight.shape[0])
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(count)]


def _max_length(folder: Path, spec: EncoderSpec, model: Any) -> int:
    """The model's own limit, lowered by a sentence-transformers max_seq_length."""
    length = spec.max_length(model.config)
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        try:
            value = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        except (UnicodeDecodeError, json.JSONDecodeError):
            value = None
        if isinstance(value, int) and 0 < value < length:
            length = value
    return length


def _listed(value: object) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip()]
    return items or None
