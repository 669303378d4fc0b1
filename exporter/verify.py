"""`verify`: the bundle against the PyTorch/PEFT model it was exported from.

The reference is a greedy loop over the PEFT model's forward on the whole sequence (no
cache): PEFT's `generate` drops prefix-tuning prefixes and diverges for prompt tuning
(docs/known-issues.md), and a full forward is the plainest statement of what the adapter
means. The bundle side runs through the public runtime API, KV cache and all, so decode
steps are checked through the cache. Logits are compared step by step while both sides
have produced the same tokens; greedy agreement is reported per prompt.
"""

from __future__ import annotations

import copy
import json
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from peft_export.bundle import bottleneck as bn
from peft_export.bundle import names
from peft_export.bundle.atomic import write_text
from peft_export.bundle.manifest import Manifest, load_manifest
from peft_export.bundle.paths import confined
from peft_export.bundle.safetensors_io import read_header
from peft_export.exporter.adapter_source import read_adapter
from peft_export.exporter.bottleneck import NO_LIBRARY_REFERENCE
from peft_export.exporter.errors import ExportError
from peft_export.exporter.quantize.blocks import BlockQuantized
from peft_export.exporter.quantize.reference import (
    EVAL_TEXT,
    graph_blocks,
    load_blocks,
    quantization_effect,
)
from peft_export.exporter.quantize.scheme import ACCURACY_EXACT

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Explain what a computer is to a child.",
)


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria. fp16 bundles are judged on a looser logits bound and greedy agreement."""

    atol: float
    min_greedy_agreement: float

    @classmethod
    def for_precision(cls, precision: str) -> Tolerance:
        return {
            "fp32": cls(atol=1e-3, min_greedy_agreement=1.0),
            "fp16": cls(atol=0.25, min_greedy_agreement=0.8),
            "bf16": cls(atol=1.0, min_greedy_agreement=0.6),
        }[precision]


@dataclass
class StepError:
    max_abs: float = 0.0
    max_rel: float = 0.0
    steps: int = 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.max_rel = max(self.max_rel, float((diff / (np.abs(ref) + 1e-6)).max()))
        self.steps += 1


@dataclass
class AdapterReport:
    adapter: str | None
    method: str
    prefill_logits: StepError = field(default_factory=StepError)
    decode_logits: StepError = field(default_factory=StepError)
    prompts_identical: int = 0
    prompts: int = 0
    tokens_compared: int = 0
    tokens_identical: int = 0
    passed: bool = False


@dataclass(frozen=True)
class Target:
    """One thing to check: an adapter (or none) and the PEFT folder that defines it."""

    name: str | None
    method: str
    source: Path | None


def verify_bundle(
    bundle_dir: str | Path,
    *,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 16,
    decode_steps: int = 8,
    adapters: Sequence[str] | None = None,
    sources: dict[str, str] | None = None,
    tolerance: Tolerance | None = None,
    backend: str = "ort",
    base_source: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Compare every adapter of the bundle (or `adapters`) with PyTorch; write the report."""
    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.bundle_writer import weights_sha256
    from peft_export.runtime import load_bundle

    console = console or Console(stderr=True)
    root = Path(bundle_dir)
    manifest = load_manifest(root)
    if manifest.encoder is not None:
        from peft_export.exporter.encoders.verify import verify_encoder

        with console.status("verifying the encoder bundle against PyTorch/PEFT"):
            return verify_encoder(
                root,
                manifest,
                texts=[] if prompts is DEFAULT_PROMPTS else prompts,
                adapters=adapters,
                sources=sources,
                atol=1e-4 if tolerance is None else tolerance.atol,
                base_source=base_source,
            )
    tolerance = tolerance or Tolerance.for_precision(manifest.precision)
    targets = _targets(root, manifest, adapters, sources or {})
    with console.status("loading the base model"):
        base = load_base(base_source or manifest.base_model.source)
        if weights_sha256(base.model) != manifest.base_model.weights_sha256:
            raise ExportError(
                f"base model {manifest.base_model.source!r} no longer matches the weights the "
                "bundle was exported from; pass --base with the original model"
            )
    # A quantized bundle's parity is judged on float32 compute over its dequantized weights;
    # serving may quantize activations too (its accuracy level), which is reported apart.
    exact = {"quant_accuracy": ACCURACY_EXACT} if manifest.quantization and backend == "ort" else {}
    bundle = load_bundle(root, backend=backend, **exact)
    prompt_ids = [_encode(bundle, text) for text in prompts]
    blocks = graph_blocks(root, manifest)
    reports, effects = [], {}
    for target in targets:
        with console.status(f"verifying {target.name or 'base'} ({target.method})"):
            reference = _reference_model(base.model, target, blocks, manifest.mode)
            report = _compare(
                bundle, reference, target, prompt_ids, max_new_tokens, decode_steps, tolerance
            )
        reports.append(report)
        console.print(_summary(report))
        if blocks:
            with console.status(f"measuring quantization's effect on {target.name or 'base'}"):
                full = _reference_model(base.model, target, {}, manifest.mode)
                effects[target.name or "base"] = quantization_effect(
                    full,
                    reference,
                    _encode_text(bundle, EVAL_TEXT),
                    prompt_ids,
                    _reference_greedy,
                    max_new_tokens,
                )
                del full
            console.print(f"quantization vs unquantized: {effects[target.name or 'base']}")
        del reference
    unverified = [
        name
        for name, record in manifest.adapters.installed.items()
        if record.method == bn.METHOD and not adapters
    ]
    rows = [t.name for t in targets] + unverified
    mixed = _mixed_batch_check(bundle, rows, prompt_ids, max_new_tokens)
    passed = all(r.passed for r in reports) and mixed.get("identical", True)
    result = {
        "bundle": str(root),
        "mode": manifest.mode,
        "precision": manifest.precision,
        "backend": backend,
        "tolerance": asdict(tolerance),
        "max_new_tokens": max_new_tokens,
        "decode_steps_compared": decode_steps,
        "prompts": list(prompts),
        "adapters": [asdict(r) for r in reports],
        "mixed_batch": mixed,
        "not_verified": {name: NO_LIBRARY_REFERENCE for name in unverified},
        "quantization": _quantization_report(manifest, effects),
        "passed": passed,
        "host": platform.platform(),
    }
    write_text(confined(root, names.PARITY_REPORT, lexical_only=True), json.dumps(result, indent=2))
    return result


def _targets(
    root: Path, manifest: Manifest, only: Sequence[str] | None, sources: dict[str, str]
) -> list[Target]:
    layout = manifest.adapters
    if manifest.mode == "merged":
        merged = layout.merged
        if not merged:
            return [Target(None, "base", None)]
        path = sources.get(merged["name"], merged.get("source"))
        return [Target(merged["name"], merged["method"], _source_dir(merged["name"], path))]
    targets = [Target(None, "base", None)]
    for name, record in layout.installed.items():
        if only and name not in only:
            continue
        if record.method == bn.METHOD:
            if only:
                raise ExportError(f"adapter {name}: {NO_LIBRARY_REFERENCE}; verify the others")
            continue
        header = read_header(confined(root, record.file))
        path = sources.get(name, header.metadata.get("source"))
        targets.append(Target(name, record.method, _source_dir(name, path)))
    unknown = set(only or ()) - set(layout.installed)
    if unknown:
        raise ExportError(
            f"adapter(s) {', '.join(sorted(unknown))} are not in the bundle; "
            "see 'peft-export adapters list'"
        )
    return targets


def _source_dir(name: str, path: str | None) -> Path:
    if not path or not Path(path).is_dir():
        raise ExportError(
            f"the PEFT folder of adapter {name!r} ({path}) is not available; "
            f"pass --source {name}=DIR to verify against it"
        )
    read_adapter(path, name=name)  # safetensors only (never a pickle), checked, before PEFT
    return Path(path)


def _encode(bundle: Any, text: str) -> list[int]:
    if bundle.codec is None:
        raise ExportError("the bundle has no tokenizer; verify needs one to encode prompts")
    return list(bundle.codec.encode_prompt(text, chat=True))


def _reference_model(
    base: torch.nn.Module, target: Target, blocks: dict[str, BlockQuantized], mode: str
) -> torch.nn.Module:
    """PyTorch/PEFT with the bundle's weights: quantized layers as the graph stores them.

    Runtime bundles quantize the base under a float adapter (QLoRA); merged bundles quantize
    the merged weights, so there the adapter is merged first and the graph's values replace
    the merged layers.
    """
    if target.source is None:
        return load_blocks(copy.deepcopy(base), blocks) if blocks else base
    from peft import PeftModel

    from peft_export.exporter.adapter_source import read_adapter
    from peft_export.exporter.merge import resize_for_added_tokens

    source = read_adapter(target.source)
    if mode == "runtime" or not blocks:
        model = load_blocks(copy.deepcopy(base), blocks)
        resize_for_added_tokens(model, source)
        return PeftModel.from_pretrained(model, str(target.source)).eval()
    base = copy.deepcopy(base)
    resize_for_added_tokens(base, source)
    merged = PeftModel.from_pretrained(base, str(target.source))
    return load_blocks(merged.merge_and_unload(), blocks).eval()


def _quantization_report(manifest: Manifest, effects: dict[str, Any]) -> dict[str, Any] | None:
    quantization = manifest.quantization
    if quantization is None:
        return None
    sources: dict[str, int] = {}
    for module in quantization.modules.values():
        sources[module.source] = sources.get(module.source, 0) + 1
    return {
        "bits": quantization.bits,
        "block_size": quantization.block_size,
        "format": quantization.format,
        "accuracy_level": quantization.accuracy_level,
        "layers": sources,
        "kept": quantization.kept,
        "reference": "PyTorch/PEFT on the graph's dequantized weights"
        + ("; adapter merged in fp32 before quantizing" if manifest.mode == "merged" else ""),
        "vs_unquantized": effects,
    }


def _encode_text(bundle: Any, text: str) -> list[int]:
    """Ids of `text`, cut to the model's context (a tiny test model has 256 positions)."""
    limit = int(bundle.manifest.generation.get("max_position_embeddings", 512))
    return list(bundle.codec.encode_prompt(text, chat=False))[: min(limit, 512)]


@torch.no_grad()
def _reference_greedy(
    model: torch.nn.Module, prompt: list[int], new_tokens: int
) -> tuple[list[int], list[np.ndarray]]:
    ids = list(prompt)
    tokens, logits = [], []
    for _ in range(new_tokens):
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
        last = out.logits[0, -1].float().numpy()
        token = int(last.argmax())
        logits.append(last)
        tokens.append(token)
        ids.append(token)
    return tokens, logits


def _bundle_greedy(
    bundle: Any, prompt: list[int], adapter: str | None, new_tokens: int
) -> tuple[list[int], list[np.ndarray]]:
    logits: list[np.ndarray] = []
    result = bundle.generate(
        [prompt],
        adapters=[adapter],
        max_new_tokens=new_tokens,
        ignore_eos=True,
        stream=lambda event: logits.append(np.array(event.logits, dtype=np.float32)),
    )
    return result.rows[0].token_ids, logits


def _compare(
    bundle: Any,
    reference: torch.nn.Module,
    target: Target,
    prompt_ids: list[list[int]],
    new_tokens: int,
    decode_steps: int,
    tolerance: Tolerance,
) -> AdapterReport:
    report = AdapterReport(adapter=target.name, method=target.method, prompts=len(prompt_ids))
    adapter = target.name if bundle.manifest.mode == "runtime" else None
    for prompt in prompt_ids:
        ref_tokens, ref_logits = _reference_greedy(reference, prompt, new_tokens)
        got_tokens, got_logits = _bundle_greedy(bundle, prompt, adapter, new_tokens)
        # A graph with extra vocabulary rows (token banks) has logits past the reference's.
        got_logits = [g[: r.shape[0]] for g, r in zip(got_logits, ref_logits, strict=False)]
        same = 0
        for step, (a, b) in enumerate(zip(ref_tokens, got_tokens, strict=False)):
            if step == 0:
                report.prefill_logits.add(ref_logits[0], got_logits[0])
            elif step <= decode_steps:
                report.decode_logits.add(ref_logits[step], got_logits[step])
            if a != b:
                break
            same += 1
        report.tokens_compared += len(ref_tokens)
        report.tokens_identical += same
        report.prompts_identical += int(same == len(ref_tokens) == len(got_tokens))
    worst = max(report.prefill_logits.max_abs, report.decode_logits.max_abs)
    agreement = report.prompts_identical / max(report.prompts, 1)
    report.passed = worst <= tolerance.atol and agreement >= tolerance.min_greedy_agreement
    return report


def _mixed_batch_check(
    bundle: Any, adapters: list[str | None], prompt_ids: list[list[int]], new_tokens: int
) -> dict[str, Any]:
    """Runtime bundles: all adapters side by side in one batch equal each row run alone."""
    if bundle.manifest.mode != "runtime" or len(adapters) < 2:
        return {}
    rows = [(name, prompt_ids[i % len(prompt_ids)]) for i, name in enumerate(adapters)]
    together = bundle.generate(
        [p for _, p in rows],
        adapters=[a for a, _ in rows],
        max_new_tokens=new_tokens,
        ignore_eos=True,
    ).token_ids
    alone = [
        bundle.generate([p], adapters=[a], max_new_tokens=new_tokens, ignore_eos=True).token_ids[0]
        for a, p in rows
    ]
    return {"rows": len(rows), "identical": together == alone}


def _summary(report: AdapterReport) -> str:
    verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
    return (
        f"{verdict} {report.adapter or 'base'} ({report.method}): "
        f"prefill max abs {report.prefill_logits.max_abs:.2e}, "
        f"decode max abs {report.decode_logits.max_abs:.2e}, "
        f"greedy identical on {report.prompts_identical}/{report.prompts} prompts"
    )
