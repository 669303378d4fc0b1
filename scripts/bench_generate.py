"""Greedy decoding speed: our merged bundle on ONNX Runtime vs PyTorch/PEFT and transformers' ONNX.

SmolLM2-135M + a LoRA (models/examples/pirate when it exists, else a seeded random LoRA on
q_proj/v_proj, rank 8), 64 new tokens, batch 1 and 8, every side measured in this one run
(median of repeats), denormals flushed on every side. Ours twice: the portable graph (the
default export, what TensorRT builds) and `--ort-fusions cpu` (ONNX Runtime contrib ops).
Every side decodes all new tokens (EOS is picked like any token and decoding goes on), and
on every repeat each side's greedy ids must equal PyTorch/PEFT unmerged's, all of them (all
sides are fp32; scripts/bench_checks.py), and the adapter must change PyTorch's ids at all.
Prints one JSON object, with the check under "output_check"; exit status 1 if it failed.

    python scripts/bench_generate.py            # full: also transformers' exporter (~5 min)
    python scripts/bench_generate.py --quick    # 1 repeat, no transformers exporter
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_checks import Compare, OutputCheck, Sample, finish, rounds

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_ADAPTER = REPO / "models" / "examples" / "pirate"
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in one paragraph.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Tell me a story about a brave mouse.",
    "How do I make a cup of tea?",
    "What are the planets of the solar system?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, skip transformers' ONNX")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=None, help="default: available cores")
    parser.add_argument("--workdir", type=Path, default=None, help="keep exports here")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse exports already in --workdir (not timed)"
    )
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    batches = [int(b) for b in args.batches.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peft-export-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # exporters print progress; keep stdout JSON
        report, check = run(args, repeats, batches, workdir)
    sys.exit(finish(report, check))


def run(
    args: argparse.Namespace, repeats: int, batches: list[int], workdir: Path
) -> tuple[dict, OutputCheck]:
    import torch
    from peft import PeftModel

    from peft_export.exporter.base_model import load_base
    from peft_export.exporter.pipeline import export_bundle
    from peft_export.runtime import load_bundle
    from peft_export.runtime.backends.ort import available_cores

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    new = args.new_tokens
    report: dict = {
        "model": "smollm2-135m",
        "new_tokens": new,
        "batches": batches,
        "repeats": repeats,
        "threads": threads,
        "denormals": "flushed on every side: torch.set_flush_denormal(True); ONNX Runtime "
        "session.set_denormal_as_zero=1 (ours and transformers' graphs)",
        "tokens_per_second": {},
        "export_seconds": {},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }

    base = load_base("smollm2-135m")
    tokenizer = base.tokenizer
    adapter, report["adapter"] = _adapter(base.model, workdir)

    bundle_dir = workdir / "bundle"
    if args.reuse and (bundle_dir / "manifest.json").is_file():
        report["export_seconds"]["ours_merged_bundle"] = "reused"
    else:
        start = time.perf_counter()
        export_bundle(base, [("pirate", str(adapter))], out=bundle_dir, mode="merged", force=True)
        report["export_seconds"]["ours_merged_bundle"] = round(time.perf_counter() - start, 1)

    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in PROMPTS
    ]
    prompt_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]

    bundle = load_bundle(bundle_dir, threads=threads, denormals_as_zero=True)
    ours_ids = bundle.generate(PROMPTS[:1], max_new_tokens=4).rows[0].prompt_ids
    report["prompt_ids_match_transformers_template"] = ours_ids == prompt_ids[0]

    def ours(batch: int) -> list[list[int]]:
        result = bundle.generate(prompt_ids[:batch], max_new_tokens=new, ignore_eos=True)
        return result.token_ids

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(adapter)).eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()

    def torch_side(model: torch.nn.Module) -> Callable[[int], list[list[int]]]:
        def generate(batch: int) -> list[list[int]]:
            tokenizer.padding_side = "left"
            enc = tokenizer(
                chats[:batch], add_special_tokens=False, padding=True, return_tensors="pt"
            )
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=new,
                    do_sample=False,
                    eos_token_id=[],  # no stop: EOS is decoded on, as ignore_eos does
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
            return out[:, enc["input_ids"].shape[1] :].tolist()

        return generate

    sides: dict[str, Callable[[int], list[list[int]]]] = {
        "ours_merged_bundle_ort_portable": ours,
        "torch_peft_unmerged": torch_side(peft_model),
        "torch_merged": torch_side(merged),
    }
    if not args.quick:
        fused_dir, seconds = _ort_fused_export(base, adapter, workdir, args.reuse)
        report["export_seconds"]["ours_merged_bundle_ort_fused"] = seconds
        fused = load_bundle(fused_dir, threads=threads, denormals_as_zero=True)
        sides["ours_merged_bundle_ort_fused"] = lambda batch: (
            fused.generate(prompt_ids[:batch], max_new_tokens=new, ignore_eos=True).token_ids
        )
        report["ours_merged_bundle_ort_fused_note"] = (
            "the bundle as 'export --ort-fusions cpu' writes it: traced at opset 23, then "
            "fused for ONNX Runtime; TensorRT cannot build it"
        )
        hf_generate, plain_loop, seconds = _transformers_onnx(
            merged, prompt_ids, threads, new, workdir, args.reuse
        )
        report["export_seconds"]["transformers_onnx_exporter"] = seconds
        sides["transformers_onnx_runner"] = hf_generate
        sides["transformers_onnx_graphs_plain_loop"] = plain_loop
        report["transformers_onnx_note"] = (
            "fixed batch 1: batch 8 runs the 8 prompts one after another"
        )

    check = OutputCheck(
        "greedy ids of every side equal torch_peft_unmerged's, all new tokens of every row, "
        "on every repeat and batch (all sides fp32); the adapter changes PyTorch's ids"
    )
    with peft_model.disable_adapter():
        without = torch_side(peft_model)(1)
    check.differs(
        "the adapter changes torch_peft_unmerged's ids", sides["torch_peft_unmerged"](1), without
    )
    for generate in sides.values():
        generate(1)  # warm-up (session arenas, torch kernels)
    compares = [
        Compare(name, "torch_peft_unmerged") for name in sides if name != "torch_peft_unmerged"
    ]
    times: dict[str, dict[int, list[float]]] = {name: {} for name in sides}
    for batch in batches:
        timed = {name: [_timed(generate, batch)] for name, generate in sides.items()}
        seconds = rounds(timed, repeats, check, compares, case=f"batch {batch}", warmup=False)
        for name, runs in seconds.items():
            times[name][batch] = [r[0] for r in runs]
    for name in sides:
        report["tokens_per_second"][name] = {
            str(b): round(b * new / statistics.median(times[name][b]), 2) for b in batches
        }
        print(f"{name}: {report['tokens_per_second'][name]}", file=sys.stderr)
    report["timing"] = (
        "per batch, repeats interleaved over the sides (in reverse order every other "
        "repeat), so a slow spell of the machine hits every side alike; median per side"
    )
    report["ratios"] = _ratios(report["tokens_per_second"], batches)
    report["bundle_dir"] = str(bundle_dir)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report, check


def _timed(generate: Callable[[int], list[list[int]]], batch: int) -> Callable[[], Sample]:
    """One run of a side at `batch`: its seconds and greedy ids."""

    def run() -> Sample:
        start = time.perf_counter()
        ids = generate(batch)
        return Sample(time.perf_counter() - start, ids)

    return run


def _adapter(model, workdir: Path) -> tuple[Path, str]:
    """The example pirate LoRA, or a seeded random LoRA (q_proj, v_proj, rank 8) in its place."""
    if (EXAMPLE_ADAPTER / "adapter_config.json").is_file():
        return EXAMPLE_ADAPTER, "models/examples/pirate"
    out = workdir / "random-lora"
    if (out / "adapter_config.json").is_file():
        return out, "random LoRA q_proj,v_proj r=8 (models/examples/pirate not found)"
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(out)
    return out, "random LoRA q_proj,v_proj r=8 (models/examples/pirate not found)"


def _ort_fused_export(base, adapter: Path, workdir: Path, reuse: bool) -> tuple[Path, float | str]:
    """The bundle as `export --ort-fusions cpu` writes it (opset 23, then fused)."""
    from peft_export.exporter.graph.ort_fusions import ORT_OPSET, ort_fusion_step
    from peft_export.exporter.pipeline import export_bundle

    out = workdir / "bundle-ort-fused"
    if reuse and (out / "manifest.json").is_file():
        return out, "reused"
    start = time.perf_counter()
    export_bundle(
        base,
        [("pirate", str(adapter))],
        out=out,
        mode="merged",
        force=True,
        options={"ort_fusions": "cpu"},
        post_steps=[ort_fusion_step],
        opset=ORT_OPSET,
    )
    return out, round(time.perf_counter() - start, 1)


def _transformers_onnx(merged, prompt_ids, threads: int, new: int, workdir: Path, reuse: bool):
    """Export the merged model with transformers' own exporter; greedy-decode with its runner."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers.exporters import OnnxExporter
    from transformers.exporters.base import ExportedModel
    from transformers.exporters.configs import OnnxConfig

    out = workdir / "transformers-onnx"
    sample = {
        "input_ids": torch.tensor([prompt_ids[0]]),
        "attention_mask": torch.ones(1, len(prompt_ids[0]), dtype=torch.int64),
    }
    seconds: float | str = "reused"
    if not (reuse and (out / "decode.onnx").is_file()):
        start = time.perf_counter()
        exported = OnnxExporter().export_for_generation(
            copy.deepcopy(merged), sample, OnnxConfig(dynamic=True, ort_fusions="cpu")
        )
        exported.save_pretrained(out)
        seconds = round(time.perf_counter() - start, 1)
    loaded = ExportedModel.from_pretrained(out)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    for name, runner in loaded.runners.items():
        runner.session = ort.InferenceSession(
            str(out / f"{name}.onnx"), options, providers=["CPUExecutionProvider"]
        )
    prefill, decode = loaded.runners["prefill"], loaded.runners["decode"]

    def one(ids: list[int]) -> list[int]:
        tokens: list[int] = []
        with torch.no_grad():
            step = prefill(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None])
            for position in range(len(ids), len(ids) + new):
                tokens.append(int(step.logits[0, -1].argmax()))
                if len(tokens) == new:
                    break
                step = decode(
                    input_ids=torch.tensor([[tokens[-1]]]),
                    position_ids=torch.tensor([[position]]),
                    cache=step.cache,
                )
        return tokens

    sessions = {name: runner.session for name, runner in loaded.runners.items()}
    decode_inputs = [i.name for i in sessions["decode"].get_inputs()][2:]

    def plain(ids: list[int]) -> list[int]:
        """Its graphs driven by plain session.run calls, without its runner's torch glue."""
        feeds = {"input_ids": np.array([ids]), "position_ids": np.arange(len(ids))[None]}
        logits, *cache = sessions["prefill"].run(None, feeds)
        tokens: list[int] = []
        for position in range(len(ids), len(ids) + new):
            tokens.append(int(logits[0, -1].argmax()))
            if len(tokens) == new:
                break
            feeds = {"input_ids": np.array([[tokens[-1]]]), "position_ids": np.array([[position]])}
            feeds.update(zip(decode_inputs, cache, strict=True))
            logits, *cache = sessions["decode"].run(None, feeds)
        return tokens

    def generate(batch: int) -> list[list[int]]:
        return [one(ids) for ids in prompt_ids[:batch]]

    def generate_plain(batch: int) -> list[list[int]]:
        return [plain(ids) for ids in prompt_ids[:batch]]

    return generate, generate_plain, seconds


def _ratios(tps: dict[str, dict[str, float]], batches: list[int]) -> dict:
    """Each of our sides against PyTorch/PEFT and the best of transformers' ONNX paths."""
    onnx = [k for k in tps if k.startswith("transformers_onnx")]
    ratios: dict = {}
    for b in map(str, batches):
        ratios[b] = {}
        for ours in (k for k in tps if k.startswith("ours_")):
            short = ours.removeprefix("ours_merged_bundle_")
            ratios[b][f"{short}_vs_torch_peft_unmerged"] = round(
                tps[ours][b] / tps["torch_peft_unmerged"][b], 2
            )
            ratios[b][f"{short}_vs_torch_merged"] = round(tps[ours][b] / tps["torch_merged"][b], 2)
            if onnx:
                best = max(tps[k][b] for k in onnx)
                ratios[b][f"{short}_vs_best_transformers_onnx"] = round(tps[ours][b] / best, 2)
    return ratios


if __name__ == "__main__":
    main()
