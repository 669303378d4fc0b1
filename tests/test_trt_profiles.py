"""Profile derivation: CLI ranges + manifest dims -> prefill/decode shapes (no TensorRT)."""

from __future__ import annotations

import dataclasses

import pytest

from peft_export.bundle import names
from peft_export.bundle.manifest import (
    AdapterLayout,
    BaseModelInfo,
    GraphSpec,
    KVLayout,
    Manifest,
    ModuleSlot,
    TensorSpec,
)
from peft_export.exporter.engines.profiles import (
    DECODE,
    PREFILL,
    DimRange,
    ProfileRequest,
    derive_profiles,
    input_shapes,
    shape_in_profile,
)
from peft_export.exporter.errors import ExportError

Q_PROJ = "model.layers.0.self_attn.q_proj"


def manifest(
    *, prompt: int = 0, prefix: int = 0, slots: int = 0, adaption: int = 0, positions: int = 2048
) -> Manifest:
    total = "prompt_len + seq" if prompt else "seq"
    inputs = [TensorSpec(names.INPUT_IDS, "int64", ["batch", "seq"])]
    if prompt:
        inputs.append(TensorSpec(names.PROMPT_EMBEDS, "float32", ["batch", "prompt_len", 16]))
    inputs += [
        TensorSpec(names.ATTENTION_MASK, "int64", ["batch", f"past + {total}"]),
        TensorSpec(names.POSITION_IDS, "int64", ["batch", total]),
        TensorSpec(names.past_key(0), "float32", ["batch", 2, "past", 8]),
        TensorSpec(names.past_value(0), "float32", ["batch", 2, "past", 8]),
    ]
    layout = AdapterLayout(prefix_max_len=prefix, prompt_max_len=prompt, adaption_max_len=adaption)
    if slots:
        layout.slots, layout.r_max, layout.methods = slots, 4, ["lora"]
        layout.modules = [ModuleSlot(Q_PROJ, 16, 16)]
        inputs += [
            TensorSpec(names.lora_input(Q_PROJ, "A"), "float32", ["slots", 4, 16]),
            TensorSpec(names.ADAPTER_IDS, "int64", ["batch"]),
        ]
    if adaption:
        inputs.append(TensorSpec("adaption_mask", "int64", ["batch", "adaption_len"]))
    return Manifest(
        base_model=BaseModelInfo("tiny", "llama", {}, "0" * 64),
        mode="runtime" if slots or prompt or prefix else "merged",
        precision="fp32",
        opset=18,
        graph=GraphSpec(names.GRAPH, inputs, [TensorSpec(names.LOGITS, "float32", ["batch"])]),
        kv=KVLayout(1, 2, 8, "float32"),
        vocab_size=32,
        hidden_size=16,
        adapters=layout,
        generation={"max_position_embeddings": positions},
    )


def request(batch: str = "1:2:4", seq: str = "1:16:64", past: str = "0:32:128") -> ProfileRequest:
    return ProfileRequest(
        DimRange.parse(batch, "--batch"),
        DimRange.parse(seq, "--seq"),
        DimRange.parse(past, "--past"),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1:4:8", (1, 4, 8)), ("2:8", (2, 8, 8)), ("5", (5, 5, 5)), ("0:0:0", (0, 0, 0))],
)
def test_range_parsing(text: str, expected: tuple[int, int, int]) -> None:
    parsed = DimRange.parse(text, "--x")
    assert (parsed.min, parsed.opt, parsed.max) == expected


@pytest.mark.parametrize("text", ["8:4:2", "a:b:c", "1:2:3:4", "", "-1:2:3"])
def test_bad_ranges_name_the_option(text: str) -> None:
    with pytest.raises(ExportError, match="--batch"):
        DimRange.parse(text, "--batch")


def test_prefill_and_decode_profiles_of_a_merged_graph() -> None:
    profiles = derive_profiles(manifest(), request())
    assert profiles[PREFILL] == {"batch": [1, 2, 4], "seq": [1, 16, 64], "past": [0, 0, 128]}
    assert profiles[DECODE] == {"batch": [1, 2, 4], "seq": [1, 1, 1], "past": [0, 32, 128]}


def test_input_shapes_evaluate_dim_sums() -> None:
    m = manifest()
    shapes = input_shapes(m.graph, derive_profiles(m, request())[DECODE])
    assert shapes[names.INPUT_IDS] == ((1, 1), (2, 1), (4, 1))
    assert shapes[names.ATTENTION_MASK] == ((1, 1), (2, 33), (4, 129))
    assert shapes[names.past_key(0)] == ((1, 2, 0, 8), (2, 2, 32, 8), (4, 2, 128, 8))


def test_prompt_bundle_feeds_prompt_only_in_prefill() -> None:
    m = manifest(prompt=5)
    prefill, decode = derive_profiles(m, request())
    assert prefill["prompt_len"] == [0, 5, 5] and decode["prompt_len"] == [0, 0, 0]
    shapes = input_shapes(m.graph, prefill)
    assert shapes[names.PROMPT_EMBEDS] == ((1, 0, 16), (2, 5, 16), (4, 5, 16))
    assert shapes[names.POSITION_IDS] == ((1, 1), (2, 21), (4, 69))
    assert shapes[names.ATTENTION_MASK][2] == (4, 128 + 5 + 64)


def test_prefix_tuning_widens_past_to_the_prefix() -> None:
    prefill, decode = derive_profiles(manifest(prefix=200), request(past="0:32:128"))
    assert prefill["past"] == [0, 200, 200] and decode["past"] == [0, 32, 200]


def test_runtime_banks_fix_the_slot_count() -> None:
    m = manifest(slots=6)
    prefill, decode = derive_profiles(m, request())
    assert prefill["slots"] == decode["slots"] == [6, 6, 6]
    bank = input_shapes(m.graph, decode)[names.lora_input(Q_PROJ, "A")]
    assert bank == ((6, 4, 16),) * 3
    assert input_shapes(m.graph, decode)[names.ADAPTER_IDS] == ((1,), (2,), (4,))
    overridden = derive_profiles(m, dataclasses.replace(request(), slots=3))
    assert overridden[PREFILL]["slots"] == [3, 3, 3]


def test_adaption_prompt_length_is_at_least_one() -> None:
    prefill, decode = derive_profiles(manifest(adaption=10), request())
    assert prefill["adaption_len"] == decode["adaption_len"] == [1, 10, 10]


def test_ranges_beyond_the_model_positions_are_refused() -> None:
    with pytest.raises(ExportError, match="positions"):
        derive_profiles(manifest(), request(seq="1:16:1024", past="0:32:1500"))


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ExportError, match="--batch"):
        derive_profiles(manifest(), request(batch="0:1:2"))


def test_unknown_dimension_names_are_refused_with_the_fix() -> None:
    m = manifest()
    m.graph.inputs[1].shape = ["batch", "total"]
    with pytest.raises(ExportError, match="'total'"):
        input_shapes(m.graph, derive_profiles(m, request())[PREFILL])


def test_shape_in_profile_explains_misfits() -> None:
    m = manifest()
    decode = derive_profiles(m, request())[DECODE]
    assert shape_in_profile(m.graph, decode, {names.INPUT_IDS: (3, 1)}) is None
    assert "dimension 1" in shape_in_profile(m.graph, decode, {names.INPUT_IDS: (3, 2)})
    assert "dimension 0" in shape_in_profile(m.graph, decode, {names.INPUT_IDS: (5, 1)})
    assert "not an input" in shape_in_profile(m.graph, decode, {"nope": (1,)})


def test_default_ranges_are_the_documented_ones_where_they_fit() -> None:
    prefill, decode = derive_profiles(manifest(), ProfileRequest())
    assert prefill == {"batch": [1, 1, 8], "seq": [1, 128, 512], "past": [0, 0, 1024]}
    assert decode == {"batch": [1, 1, 8], "seq": [1, 1, 1], "past": [0, 256, 1024]}


@pytest.mark.parametrize(
    ("positions", "prompt", "given", "seq", "past"),
    [
        (256, 0, {}, [1, 85, 85], [0, 171, 171]),  # a third for prefill, the rest for the past
        (256, 16, {}, [1, 80, 80], [0, 160, 160]),  # prompt-tuning tokens count first
        (1024, 0, {}, [1, 128, 341], [0, 256, 683]),
        (256, 0, {"seq": "1:16:64"}, [1, 16, 64], [0, 192, 192]),  # the past gets the rest
        (256, 0, {"past": "0:8:16"}, [1, 128, 240], [0, 8, 16]),  # ...or the prefill does
    ],
)
def test_default_ranges_are_cut_to_the_model_positions(positions, prompt, given, seq, past):
    """`export --engine trt` of a model with a short context needs no --seq/--past."""
    ranges = {k: DimRange.parse(v, f"--{k}") for k, v in given.items()}
    m = manifest(prompt=prompt, positions=positions)
    prefill, decode = derive_profiles(m, ProfileRequest(**ranges))
    assert prefill["seq"] == seq and decode["past"] == past
    assert seq[2] + past[2] + prompt == positions
