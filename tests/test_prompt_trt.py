"""A bundle with every prompt-side input (prefix past, prompt_embeds, AdaptionPrompt) is
TensorRT-buildable: TensorRT-RTX ahead of time for sm86, no GPU needed."""

from __future__ import annotations

import importlib.util

import pytest
from tiny import make_adapter, tiny_model

from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None
    and importlib.util.find_spec("tensorrt") is None,
    reason="no TensorRT or TensorRT-RTX installed",
)


def test_prompt_side_inputs_build_an_engine(tmp_path) -> None:
    from peft_export.exporter.engines.build import EngineOptions, build_engines

    model = tiny_model("llama")
    adapters = [
        (name, make_adapter(model, method, tmp_path, name=name))
        for name, method in (("a", "adaption_prompt"), ("p", "prompt_tuning"))
    ]
    out = tmp_path / "bundle"
    manifest = export_bundle(
        InMemoryBase(model),
        adapters,
        out=out,
        mode="runtime",
        planners=[plan_prompt_inputs],
        options={"prefix_max_len": 4},
    )
    options = EngineOptions(batch="1:2:4", seq="1:8:32", past="0:16:64", progress=False)
    record = build_engines(out, manifest, options)
    prefill, decode = record.profiles
    assert prefill["adaption_len"] == decode["adaption_len"] == [1, 4, 4]
    assert prefill["prompt_len"] == [0, 4, 4] and decode["prompt_len"] == [0, 0, 0]
    assert prefill["past"][1] >= manifest.adapters.prefix_max_len
    assert (out / record.file).stat().st_size > 10_000
