"""OpenVINO GenAI: its own virtualenv (openvino-genai, optimum-intel for conversion), the base
converted with `optimum-cli export openvino --weight-format fp32|int8|int4`; the PEFT LoRA is
applied at runtime from its safetensors (ov_genai.Adapter), so no adapter conversion.

optimum-intel pins an older transformers (installed into the virtualenv only) and drags in
torchvision, whose wheel here does not match the project's torch and breaks importing
transformers: it is uninstalled again. Cached under WORKDIR/openvino.
"""

from __future__ import annotations

import json
from pathlib import Path

from setup_common import (
    SideSpec,
    file_digest,
    int4_class,
    run_logged,
    stamp_matches,
    venv_python,
    write_stamp,
)

VERSION = "2026.4.1"
PRECISIONS = {"openvino_fp32": "fp32", "openvino_int8": "int8", "openvino_int4": "int4"}
# optimum's int4 default group size (128) does not divide SmolLM2's 576 input features and
# nncf refuses it; 32 is the block every other int4 side here uses.
EXTRA_ARGS = {"int4": ["--group-size", "32"]}
FP32_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}


def setup(name: str, workdir: Path, checkpoint: Path, adapter: Path, threads: int) -> SideSpec:
    root = workdir / "openvino"
    log = root / "setup.log"
    requirements = [f"openvino-genai=={VERSION}", "optimum-intel", "nncf"]
    python = venv_python(root / "venv", requirements, log, after=["torchvision"])
    precision = PRECISIONS[name]
    model = root / precision
    extra = EXTRA_ARGS.get(precision, [])
    key = f"{VERSION} {precision} {extra} {file_digest(checkpoint / 'model.safetensors')}"
    if not stamp_matches(model, key):
        cli = Path(python).parent / "optimum-cli"
        task = ["--task", "text-generation-with-past", "--weight-format", precision, *extra]
        run_logged([cli, "export", "openvino", "--model", checkpoint, *task, model], log, cwd=root)
        write_stamp(model, key)
    lora = json.loads((adapter / "adapter_config.json").read_text())
    alpha = lora["lora_alpha"] / lora["r"]
    properties = FP32_PROPERTIES if precision == "fp32" else {}
    return SideSpec(
        name=name,
        peer="openvino-genai",
        precision=int4_class(_head_bits(model)) if precision == "int4" else precision,
        python=python,
        module="side_openvino",
        config={
            "model_dir": str(model),
            "adapter_file": str(adapter / "adapter_model.safetensors"),
            "alpha": alpha,
            "threads": threads,
            "properties": properties,
        },
        files=[model, adapter / "adapter_model.safetensors"],
        settings={
            "build": " ".join(["optimum-cli export openvino --weight-format", precision, *extra])
            + " (else optimum-intel's defaults), the PEFT LoRA at runtime (AdapterConfig "
            f"MODE_DYNAMIC, alpha = lora_alpha / r = {alpha})",
            "plugin_properties": properties or "CPU plugin defaults (bar threads, denormals)",
            "eos": "ignore_eos (continues past EOS)",
        },
    )


def _head_bits(model: Path) -> int:
    """The bit width of the IR's token table / head (the constant of vocabulary rows)."""
    import re

    xml = (model / "openvino_model.xml").read_text()
    config = json.loads((model / "config.json").read_text())
    constant = re.compile(r'type="Const"[^>]*>\s*<data element_type="(\w+)" shape="(\d+), \d+"')
    widths = {"u8": 8, "i8": 8, "u4": 4, "i4": 4, "f16": 16, "f32": 32}
    rows = [kind for kind, first in constant.findall(xml) if int(first) == config["vocab_size"]]
    return min((widths.get(kind, 32) for kind in rows), default=0)
