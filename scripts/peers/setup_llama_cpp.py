"""llama.cpp: the build (native CPU flags, AMX left out) and binding (setup_llama_cpp.sh),
the base converted from the HF checkpoint to an F32 GGUF (convert_hf_to_gguf.py) and
quantized to Q8_0 / Q4_0 (llama-quantize), the PEFT LoRA converted to an F32 LoRA GGUF
(convert_lora_to_gguf.py) and applied at runtime. Converters use the gguf-py vendored next to
them. Cached under WORKDIR/llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

from setup_common import HERE, SetupError, SideSpec, file_digest, int4_class, run_logged

VERSION = "0.3.36"
PRECISIONS = {"llama_cpp_f32": "F32", "llama_cpp_q8_0": "Q8_0", "llama_cpp_q4_0": "Q4_0"}
CLASSES = {"F32": "fp32", "Q8_0": "int8", "Q4_0": "int4"}
N_CTX = 256


def setup(name: str, workdir: Path, checkpoint: Path, adapter: Path, threads: int) -> SideSpec:
    root = workdir / "llama.cpp"
    log = root / "setup.log"
    run_logged(["bash", HERE / "setup_llama_cpp.sh", workdir], log)
    lib = Path((root / "lib_dir").read_text().strip())
    source = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    python = str(root / "venv" / "bin" / "python")
    models = root / "models"
    models.mkdir(exist_ok=True)
    base_key = f"{VERSION} {file_digest(checkpoint / 'model.safetensors')}"
    f32 = models / "smollm2-f32.gguf"
    if not _fresh(f32, base_key):
        convert = [python, source / "convert_hf_to_gguf.py", checkpoint, "--outtype", "f32"]
        run_logged([*convert, "--outfile", f32], log, cwd=root)
        _stamp(f32, base_key)
    lora = models / "pirate-f32.gguf"
    lora_key = f"{base_key} {file_digest(adapter / 'adapter_model.safetensors')}"
    if not _fresh(lora, lora_key):
        convert = [python, source / "convert_lora_to_gguf.py", adapter, "--base", checkpoint]
        run_logged([*convert, "--outtype", "f32", "--outfile", lora], log, cwd=root)
        _stamp(lora, lora_key)
    kind = PRECISIONS[name]
    model = f32
    if kind != "F32":
        model = models / f"smollm2-{kind.lower()}.gguf"
        if not _fresh(model, base_key):
            run_logged([lib / "llama-quantize", f32, model, kind], log, cwd=root)
            _stamp(model, base_key)
    if not model.is_file():
        raise SetupError(f"llama.cpp conversion left no {model}")
    precision = CLASSES[kind]
    if precision == "int4":
        precision = int4_class(_head_bits(model))
    return SideSpec(
        name=name,
        peer="llama.cpp",
        precision=precision,
        python=python,
        module="side_llama_cpp",
        config={
            "model": str(model),
            "lora": str(lora),
            "threads": threads,
            "n_ctx": N_CTX,
            "kv_f32": kind == "F32",
        },
        files=[model, lora],
        settings={
            "build": "convert_hf_to_gguf.py --outtype f32"
            + ("" if kind == "F32" else f" + llama-quantize {kind}")
            + "; LoRA: convert_lora_to_gguf.py --outtype f32, applied at runtime (scale 1.0)",
            "kv_cache": "f32" if kind == "F32" else "llama.cpp default (f16)",
            "eos": "plain loop with llama.cpp's greedy sampler; EOS does not stop it",
        },
        env={"LLAMA_CPP_LIB_PATH": str(lib)},
        ftz=True,  # ggml has no denormal setting
    )


def _head_bits(model: Path) -> int:
    """The bit width of the GGUF's output head (output.weight, else the tied token table)."""
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(model).tensors}
    head = types.get("output.weight", types.get("token_embd.weight"))
    return {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "F32": 32, "F16": 16}.get(head, 0)


def _fresh(path: Path, key: str) -> bool:
    stamp = path.with_name(path.name + ".stamp")
    return path.is_file() and stamp.is_file() and stamp.read_text() == key


def _stamp(path: Path, key: str) -> None:
    path.with_name(path.name + ".stamp").write_text(key)
