"""The runtime side of prompt-side adapters, without a graph: feed layout and file checks."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from peft_export.bundle import names
from peft_export.bundle.manifest import (
    AdapterLayout,
    BaseModelInfo,
    GraphSpec,
    InstalledAdapter,
    KVLayout,
    Manifest,
)
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.prompt_inputs import PromptAdapter, PromptBatch, load_prompt_adapter

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN = 2, 2, 4, 8


def manifest(**bounds: int) -> Manifest:
    layout = AdapterLayout(
        methods=["prefix_tuning", "prompt_tuning", "adaption_prompt"],
        **{"prefix_max_len": 4, "prompt_max_len": 4, "adaption_max_len": 4, **bounds},
    )
    return Manifest(
        base_model=BaseModelInfo("tiny", "llama", {"model_type": "llama"}, "sha-base"),
        mode="runtime",
        precision="fp32",
        opset=18,
        graph=GraphSpec(names.GRAPH, [], []),
        kv=KVLayout(LAYERS, KV_HEADS, HEAD_DIM, "float32"),
        vocab_size=16,
        hidden_size=HIDDEN,
        adapters=layout,
    )


def prefix(n: int, value: float) -> PromptAdapter:
    tensors = {}
    for i in range(LAYERS):
        tensors[names.prefix_key(i)] = np.full((KV_HEADS, n, HEAD_DIM), value, np.float32)
        tensors[names.prefix_value(i)] = np.full((KV_HEADS, n, HEAD_DIM), -value, np.float32)
    return PromptAdapter(f"prefix{n}", "prefix_tuning", n, tensors)


def prompt(n: int, value: float) -> PromptAdapter:
    embeds = np.full((n, HIDDEN), value, np.float32)
    return PromptAdapter(f"prompt{n}", "prompt_tuning", n, {names.PROMPT_EMBEDS: embeds})


def adaption(n: int, layers: tuple[int, ...]) -> PromptAdapter:
    tensors = {}
    for i in layers:
        tensors[names.adaption_key(i)] = np.ones((KV_HEADS, n, HEAD_DIM), np.float32)
        tensors[names.adaption_value(i)] = np.ones((KV_HEADS, n, HEAD_DIM), np.float32)
        tensors[names.adaption_gate(i)] = np.array([0.5], np.float32)
    return PromptAdapter("adaption", "adaption_prompt", n, tensors)


def test_rows_are_left_padded_with_mask_zero() -> None:
    rows = [prefix(2, 1.0), prefix(3, 2.0), prompt(2, 3.0), None, adaption(3, (1,))]
    batch = PromptBatch(rows, manifest(), np.float32)
    assert (batch.prefix_len, batch.prompt_len) == (3, 2)
    assert batch.prefix_mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert batch.prompt_mask.tolist() == [[0, 0], [0, 0], [1, 1], [0, 0], [0, 0]]
    first = batch.step_feeds(0)
    key = first[names.past_key(1)]
    assert key.shape == (5, KV_HEADS, 3, HEAD_DIM)
    assert (key[0, :, 0] == 0).all() and (key[0, :, 1:] == 1.0).all()
    assert (key[1] == 2.0).all() and (key[2:] == 0).all()
    assert (first[names.past_value(0)][1] == -2.0).all()
    embeds = first[names.PROMPT_EMBEDS]
    assert embeds.shape == (5, 2, HIDDEN) and (embeds[2] == 3.0).all()
    assert (np.delete(embeds, 2, axis=0) == 0).all()
    assert first[names.adaption_gate(1)].tolist() == [0, 0, 0, 0, 0.5]
    assert first[names.adaption_gate(0)].tolist() == [0] * 5
    assert first[names.ADAPTION_MASK].tolist()[4] == [1, 1, 1]


def test_later_steps_feed_no_prefix_and_an_empty_prompt() -> None:
    batch = PromptBatch([prefix(2, 1.0), prompt(3, 1.0)], manifest(), np.float32)
    later = batch.step_feeds(1)
    assert names.past_key(0) not in later
    assert later[names.PROMPT_EMBEDS].shape == (2, 0, HIDDEN)
    assert later[names.ADAPTION_MASK].shape == (2, 1)


def install(tmp_path, m: Manifest, adapter: PromptAdapter, **meta: str) -> None:
    relative = names.adapter_file(adapter.name)
    (tmp_path / "adapters").mkdir(exist_ok=True)
    metadata = {
        "format": names.ADAPTER_FILE_FORMAT,
        "version": names.ADAPTER_FILE_VERSION,
        "method": adapter.method,
        "base_weights_sha256": m.base_model.weights_sha256,
        **meta,
    }
    save_file(adapter.tensors, str(tmp_path / relative), metadata=metadata)
    m.adapters.installed[adapter.name] = InstalledAdapter(relative, adapter.method)


def test_a_valid_file_loads(tmp_path) -> None:
    m = manifest()
    install(tmp_path, m, adaption(2, (0, 1)))
    loaded = load_prompt_adapter(tmp_path, m, "adaption")
    assert (loaded.method, loaded.length) == ("adaption_prompt", 2)


@pytest.mark.parametrize(
    ("adapter", "bounds", "meta", "message"),
    [
        (prefix(6, 1.0), {}, {}, "at most 4; re-export with --prefix-max-len 6"),
        (prompt(2, 1.0), {"prompt_max_len": 0}, {}, "--prompt-max-len 2"),
        (prompt(2, 1.0), {}, {"base_weights_sha256": "other"}, "another base model"),
        (prompt(2, 1.0), {}, {"method": "p_tuning"}, "not a prompt_tuning peft-export"),
    ],
)
def test_bad_files_are_refused(tmp_path, adapter, bounds, meta, message) -> None:
    m = manifest(**bounds)
    install(tmp_path, m, adapter, **meta)
    with pytest.raises(InferenceError, match=message):
        load_prompt_adapter(tmp_path, m, adapter.name)


def test_wrong_shapes_are_another_base(tmp_path) -> None:
    m = manifest()
    wide = PromptAdapter("wide", "prompt_tuning", 2, {names.PROMPT_EMBEDS: np.ones((2, 16))})
    install(tmp_path, m, wide)
    with pytest.raises(InferenceError, match="hidden size 8"):
        load_prompt_adapter(tmp_path, m, "wide")
    short = prefix(2, 1.0)
    del short.tensors[names.prefix_key(1)]
    install(tmp_path, m, short)
    with pytest.raises(InferenceError, match="another base"):
        load_prompt_adapter(tmp_path, m, short.name)
