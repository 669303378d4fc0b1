"""The Python runtime's generation loop on a tiny exported bundle, against PyTorch."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from tiny import CHAT_TEMPLATE, save_tiny_tokenizer, tiny_model, tiny_tokenizer

from peft_export.bundle import names
from peft_export.runtime import (
    GenerationRequest,
    InferenceError,
    InputProvider,
    Reservation,
    SamplingOptions,
    load_bundle,
)

PROMPTS = [[1, 70, 80, 90, 100, 110, 120], [1, 50], [1, 200, 13, 99, 4]]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def bundle_dir(model, tmp_path_factory):
    from peft_export.exporter.pipeline import export_model

    root = tmp_path_factory.mktemp("runtime")
    tokenizer = save_tiny_tokenizer(root / "tokenizer")
    export_model(copy.deepcopy(model), root / "bundle", tokenizer_dir=tokenizer)
    return root / "bundle"


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir, threads=1)


def test_huge_pages_move_memory_not_results(bundle_dir):
    plain = load_bundle(bundle_dir, threads=1, huge_pages=False)
    assert plain.describe()["huge_page_mib"] == 0
    huge = load_bundle(bundle_dir, threads=1)  # a tiny model may span no whole huge page
    assert huge.backend._collapse_waiting  # the move waits for the first run to end
    want = plain.generate(PROMPTS, max_new_tokens=5, ignore_eos=True).token_ids
    assert huge.generate(PROMPTS, max_new_tokens=5, ignore_eos=True).token_ids == want
    assert not huge.backend._collapse_waiting


@pytest.fixture(scope="module")
def gpt2_model():
    return tiny_model("gpt2", seed=0)


@pytest.fixture(scope="module")
def gpt2_bundle(gpt2_model, tmp_path_factory):
    """GPT-2 has learned absolute positions: wrong position ids change its output (RoPE's
    relative positions hide a constant shift)."""
    from peft_export.exporter.pipeline import export_model

    root = tmp_path_factory.mktemp("runtime-gpt2")
    export_model(copy.deepcopy(gpt2_model), root / "bundle")
    return load_bundle(root / "bundle", threads=1)


@pytest.fixture(params=["llama", "gpt2"])
def arch_pair(request):
    if request.param == "llama":
        return request.getfixturevalue("model"), request.getfixturevalue("bundle")
    return request.getfixturevalue("gpt2_model"), request.getfixturevalue("gpt2_bundle")


def torch_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Reference: recompute the whole sequence each step (no cache, no padding)."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_greedy_matches_pytorch(arch_pair):
    model, bundle = arch_pair
    result = bundle.generate(PROMPTS[:2], max_new_tokens=12, ignore_eos=True)
    for prompt, row in zip(PROMPTS, result.rows, strict=False):
        assert row.token_ids == torch_greedy(model, prompt, 12)
        assert row.finish_reason == "length"


def test_left_padded_batch_equals_rows_alone(arch_pair):
    model, bundle = arch_pair
    batch = bundle.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    for prompt, row in zip(PROMPTS, batch.rows, strict=True):
        alone = bundle.generate([prompt], max_new_tokens=10, ignore_eos=True)
        assert row.token_ids == alone.token_ids[0] == torch_greedy(model, prompt, 10)


def test_chunked_prefill_matches_pytorch(arch_pair):
    """Prompts prefilled 2 tokens per step (short rows start with all-padding chunks)."""
    model, bundle = arch_pair
    chunked = load_bundle(bundle.root, threads=1, prefill_chunk=2)
    result = chunked.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    assert result.steps == 4 + 5
    for prompt, row in zip(PROMPTS, result.rows, strict=True):
        assert row.token_ids == torch_greedy(model, prompt, 6)


def test_sampling_reproducible_and_top_k_1_is_greedy(bundle):
    kwargs = {"max_new_tokens": 10, "ignore_eos": True, "temperature": 0.9, "top_p": 0.95}
    first = bundle.generate(PROMPTS, seed=7, **kwargs)
    again = bundle.generate(PROMPTS, seed=7, **kwargs)
    other = bundle.generate(PROMPTS, seed=8, **kwargs)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    greedy = bundle.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    top1 = bundle.generate(PROMPTS, seed=3, top_k=1, **{**kwargs, "top_p": 1.0})
    assert top1.token_ids == greedy.token_ids


def test_per_row_seed_matches_row_alone(bundle):
    options = [SamplingOptions(max_new_tokens=8, temperature=1.0, seed=11 + i) for i in range(3)]
    options = [SamplingOptions(**{**o.__dict__, "ignore_eos": True}) for o in options]
    batch = bundle.run(GenerationRequest(prompts=list(PROMPTS), options=options))
    alone = bundle.run(GenerationRequest(prompts=[PROMPTS[2]], options=[options[2]]))
    assert batch.token_ids[2] == alone.token_ids[0]


def test_stop_token_and_eos(bundle_dir, bundle):
    greedy = bundle.generate([PROMPTS[0]], max_new_tokens=10, ignore_eos=True).token_ids[0]
    stop = greedy[3]
    cut = greedy.index(stop) + 1
    stopped = bundle.generate([PROMPTS[0]], max_new_tokens=10, stop_token_ids=[stop])
    assert stopped.token_ids[0] == greedy[:cut]
    assert stopped.rows[0].finish_reason == "stop_token"

    eos_bundle = load_bundle(bundle_dir, threads=1)
    eos_bundle.manifest.tokenizer.eos_token_ids = [stop]
    ended = eos_bundle.generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=10)
    assert ended.token_ids[0] == greedy[:cut]
    assert ended.rows[0].finish_reason == "eos"


def test_stop_string_cuts_text(bundle):
    full = bundle.generate(["Hello"], max_new_tokens=16, ignore_eos=True, chat_template=False)
    text = full.texts[0]
    start = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    result = bundle.generate(
        ["Hello"], max_new_tokens=16, ignore_eos=True, chat_template=False, stop_strings=stop
    )
    assert result.texts[0] == text[: text.find(stop)]
    assert result.rows[0].finish_reason == "stop_string"


def test_streaming_events_in_order(bundle):
    events = []
    result = bundle.generate(
        ["Hi", "Hello there"], max_new_tokens=8, ignore_eos=True, stream=events.append
    )
    steps = [events[i : i + 2] for i in range(0, len(events), 2)]
    assert len(steps) == 8 and all([e.row for e in step] == [0, 1] for step in steps)
    for row in (0, 1):
        mine = [e for e in events if e.row == row]
        assert [e.token_id for e in mine] == result.token_ids[row]
        assert "".join(e.text for e in mine) == result.texts[row]
        assert [e.finished for e in mine] == [False] * 7 + [True]


def test_chat_template_rendering(bundle):
    result = bundle.generate(["Hi"], max_new_tokens=1)
    expected = tiny_tokenizer().encode("<s>user: Hi</s><s>assistant: ", add_special_tokens=False)
    assert bundle.manifest.tokenizer.chat_template == CHAT_TEMPLATE
    assert result.rows[0].prompt_ids == expected.ids


def test_chat_messages_prompt(bundle):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = "<s>system: Be brief.</s><s>user: Hi</s><s>assistant: Hello</s><s>user: Bye</s>"
    expected = tiny_tokenizer().encode(text + "<s>assistant: ", add_special_tokens=False).ids
    single = bundle.generate(conversation, max_new_tokens=1)
    batch = bundle.generate([conversation, "Hi"], max_new_tokens=1)
    assert single.rows[0].prompt_ids == batch.rows[0].prompt_ids == expected
    system = bundle.generate(["Hi"], system_prompt="Be brief.", max_new_tokens=1)
    assert system.rows[0].prompt_ids == expected[: len(system.rows[0].prompt_ids)]


def test_kv_and_logits_buffers_are_bound_in_place(bundle):
    backend = bundle.backend
    seen: dict[str, set[int]] = {}
    written: list[bool] = []
    real_run = backend.run

    def spy(binding, feeds, outputs, kv=None):
        real_run(binding, feeds, outputs, kv)
        kv_feeds, kv_outputs = kv.views() if kv is not None else ({}, {})
        feeds, outputs = {**feeds, **kv_feeds}, {**outputs, **kv_outputs}
        for name, view in [*feeds.items(), *outputs.items()]:
            if name.startswith(("past_key_values", "present", names.LOGITS)):
                seen.setdefault(name.split(".")[0], set()).add(view.buffer.ptr)
        actual = backend.output_pointers(binding)
        written.append(all(actual[n] == v.ptr for n, v in outputs.items()))

    backend.run = spy
    try:
        bundle.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        bundle.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    finally:
        del backend.run
    layers = bundle.manifest.kv.num_layers
    assert len(written) == 12 and all(written)
    assert seen["past_key_values"] == seen["present"]
    assert len(seen["present"]) == 2 * 2 * layers
    assert len(seen[names.LOGITS]) == 1


def test_batched_runs_equal_io_binding_runs(bundle_dir):
    """CPU graphs without adapter banks run through one batched call (ort_values.py); the
    IOBinding path must give the same logits at every step."""
    from peft_export.runtime.backends.ort import OrtBinding
    from peft_export.runtime.backends.ort_values import OrtValueBinding, batched_runs_available

    if not batched_runs_available():
        pytest.skip("this onnxruntime lacks run_with_ortvaluevector")
    runs = {}
    for batched in (True, False):
        bundle = load_bundle(bundle_dir, threads=1)
        bundle.backend._batched = batched
        kind = OrtValueBinding if batched else OrtBinding
        workspace = bundle.workspaces.acquire()
        assert isinstance(workspace.binding, kind)
        bundle.workspaces.release(workspace)
        logits: list[np.ndarray] = []
        result = bundle.generate(
            PROMPTS,
            max_new_tokens=5,
            ignore_eos=True,
            stream=lambda event, seen=logits: seen.append(event.logits.copy()),
        )
        runs[batched] = ([r.token_ids for r in result.rows], np.stack(logits))
    assert runs[True][0] == runs[False][0]
    np.testing.assert_array_equal(runs[True][1], runs[False][1])


def test_concurrent_requests(bundle):
    expected = bundle.generate(PROMPTS, max_new_tokens=6, ignore_eos=True).token_ids
    results: list[list[list[int]]] = []

    def worker():
        results.append(bundle.generate(PROMPTS, max_new_tokens=6, ignore_eos=True).token_ids)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3


class RandomPrefix(InputProvider):
    """A prefix-tuning-like provider: fixed random KV in front of row 0 only."""

    def __init__(self, kv, length: int) -> None:
        gen = np.random.default_rng(0)
        shape = (kv.num_kv_heads, length, kv.head_dim)
        self.length = length
        self.layers = [
            (gen.standard_normal(shape, dtype=np.float32), gen.standard_normal(shape, np.float32))
            for _ in range(kv.num_layers)
        ]

    def inputs(self) -> set[str]:
        return set()

    def start(self, ctx):
        mask = np.zeros((ctx.batch, self.length), dtype=np.int64)
        mask[0] = 1
        return Reservation(prefix_len=self.length, prefix_mask=mask)

    def step(self, ctx, state):
        if state.index:
            return
        for i, (key, value) in enumerate(self.layers):
            for name, tensor in ((names.past_key(i), key), (names.past_value(i), value)):
                past = np.zeros((ctx.batch, *tensor.shape), dtype=np.float32)
                past[0] = tensor
                state.feeds[name] = past


def test_prefix_reservation_matches_pytorch_past(model, bundle_dir):
    """The provider hook: a prefix enters as past, mask 1, positions continue after it."""
    from transformers import DynamicCache

    plain = load_bundle(bundle_dir, threads=1)
    provider = RandomPrefix(plain.manifest.kv, length=3)
    hooked = load_bundle(bundle_dir, threads=1, providers=[provider], prefill_chunk=3)
    result = hooked.generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=6, ignore_eos=True)
    assert result.token_ids[1] == plain.generate([PROMPTS[1]], max_new_tokens=6).token_ids[0]

    ids = torch.tensor([PROMPTS[0]])
    expected = []
    with torch.no_grad():
        for _ in range(6):
            cache = DynamicCache(
                ddp_cache_data=[
                    (torch.from_numpy(k)[None], torch.from_numpy(v)[None])
                    for k, v in provider.layers
                ]
            )
            mask = torch.ones(1, provider.length + ids.shape[1], dtype=torch.int64)
            positions = torch.arange(provider.length, provider.length + ids.shape[1])[None]
            out = model(ids, attention_mask=mask, position_ids=positions, cache=cache).logits
            expected.append(int(out[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[expected[-1]]])], dim=1)
    assert result.token_ids[0] == expected


def test_refusals(bundle):
    with pytest.raises(InferenceError, match="takes no adapters"):
        bundle.generate(["Hi"], adapters=["fr"], max_new_tokens=2)
    with pytest.raises(InferenceError, match="positions"):
        bundle.generate([PROMPTS[0]], max_new_tokens=1000)
    with pytest.raises(InferenceError, match="outside"):
        bundle.generate([[1, 5000]], max_new_tokens=2)
    with pytest.raises(InferenceError, match="top_p"):
        bundle.generate(["Hi"], top_p=0.0)
    with pytest.raises(InferenceError, match="unknown ORT backend option"):
        load_bundle(bundle.root, threads=1, turbo=True)
    assert bundle.generate(["Hi"], max_new_tokens=0).token_ids == [[]]


def test_fp16_bundle_keeps_fp16_buffers(model, tmp_path):
    from peft_export.exporter.pipeline import export_model

    export_model(copy.deepcopy(model), tmp_path / "fp16", precision="fp16")
    half = load_bundle(tmp_path / "fp16", threads=1)
    result = half.generate([PROMPTS[0]], max_new_tokens=4, ignore_eos=True)
    assert len(result.token_ids[0]) == 4
    workspace = half.workspaces.acquire()
    assert {b.dtype for b in workspace.buffers()} == {np.dtype(np.float16)}
