"""onnxruntime-genai 0.18.0: its own virtualenv, its model builder (fp32 and int4), and the LoRA
turned into a runtime `.onnx_adapter` (ort_genai_lora.py).

The builder runs with the LoRA (`adapter_path`), which bakes it in as side branches; the
branches then become graph inputs and their fp32 values the adapter file, shared by both
precisions (int4 quantizes the base weights only). Cached under WORKDIR/ort-genai.
"""

from __future__ import annotations

from pathlib import Path

from setup_common import (
    HERE,
    SideSpec,
    file_digest,
    int4_class,
    run_logged,
    stamp_matches,
    venv_python,
    write_stamp,
)

VERSION = "0.18.0"
PRECISIONS = {"ort_genai_fp32": "fp32", "ort_genai_int4": "int4"}


def setup(name: str, workdir: Path, checkpoint: Path, adapter: Path, threads: int) -> SideSpec:
    root = workdir / "ort-genai"
    log = root / "setup.log"
    python = venv_python(root / "venv", [f"onnxruntime-genai=={VERSION}"], log)
    adapter_file = root / "pirate.onnx_adapter"
    key = f"{VERSION} {file_digest(checkpoint / 'model.safetensors')} {_adapter_key(adapter)}"
    fp32 = _build(python, root, "fp32", checkpoint, adapter, key, log, adapter_file)
    model = fp32 if PRECISIONS[name] == "fp32" else None
    if model is None:
        model = _build(python, root, "int4", checkpoint, adapter, key, log, adapter_file)
    precision = PRECISIONS[name]
    if precision == "int4":
        precision = int4_class(_head_bits(model))
    return SideSpec(
        name=name,
        peer="onnxruntime-genai",
        precision=precision,
        python=python,
        module="side_ort_genai",
        config={"model_dir": str(model), "adapter_file": str(adapter_file), "threads": threads},
        files=[model, adapter_file],
        settings={
            "build": f"model builder -p {PRECISIONS[name]} -e cpu, the LoRA as a runtime "
            ".onnx_adapter (graph inputs, fp32)",
            "decode_loop": "append_tokens + get_logits + numpy argmax (continues past EOS)",
        },
        env={"ORT_DISABLE_TELEMETRY": "1"},
    )


def _head_bits(model: Path) -> int:
    """The bit width of the MatMulNBits that writes the logits (32: a float head)."""
    import onnx

    graph = onnx.load(model / "model.onnx", load_external_data=False).graph
    head = next((n for n in graph.node if "logits" in n.output), None)
    if head is None or head.op_type != "MatMulNBits":
        return 32
    return next(a.i for a in head.attribute if a.name == "bits")


def _adapter_key(adapter: Path) -> str:
    return file_digest(adapter / "adapter_model.safetensors")


def _build(
    python: str,
    root: Path,
    precision: str,
    checkpoint: Path,
    adapter: Path,
    key: str,
    log: Path,
    adapter_file: Path,
) -> Path:
    """The builder's output for `precision` with the LoRA as graph inputs (cached)."""
    out = root / precision
    if stamp_matches(out, key) and adapter_file.is_file():
        return out
    builder = [python, "-m", "onnxruntime_genai.models.builder"]
    options = ["--extra_options", f"adapter_path={adapter}"]
    cache = root / "builder-cache"
    run_logged(
        [
            *builder,
            "-i",
            checkpoint,
            "-o",
            out,
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            cache,
            *options,
        ],
        log,
        cwd=root,  # never the package folder: importing it from there aborts
    )
    rewrite = [python, HERE / "ort_genai_lora.py"]
    if precision == "fp32":
        run_logged([*rewrite, "extract", out, adapter_file], log, cwd=root)
    elif not adapter_file.is_file():
        raise RuntimeError("build fp32 first: the int4 model reads the fp32 adapter file")
    run_logged([*rewrite, "rewrite", out, adapter_file], log, cwd=root)
    write_stamp(out, key)
    return out
