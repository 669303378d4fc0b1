"""Trainable tokens, retrained heads and activated LoRA as runtime inputs (issue 23, 4 and 5).

One tiny Llama runtime bundle (module-scoped) serves, in one batch: an adapter that adds 3
tokens (LoRA + trainable_token_indices on a resized base + its resized lm_head), one that
retrains lm_head, a TRAINABLE_TOKENS adapter, a plain LoRA, an activated LoRA and the base.
Every reference is PEFT's own forward, computed here.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from cli_run import run_cli
from peft import PeftModel
from tiny import make_adapter, save_tiny_base, tiny_model

from peft_export.bundle import names
from peft_export.bundle import token_inputs as tk
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.adapter_source import read_adapter
from peft_export.exporter.errors import ExportError
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
from peft_export.exporter.runtime_adapters.convert import check_fits_layout
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.conversation import Conversation
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.request import SamplingOptions
from peft_export.runtime.session import load_bundle

TOL = 1e-4
BASE_VOCAB = 260
ADDED = [260, 261, 262]
INVOCATION = [40, 41, 42]
STEPS = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokens")
    base = tiny_model("llama")
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(BASE_VOCAB + len(ADDED), mean_resizing=False)
    dirs = {
        "added": make_adapter(
            resized,
            "lora",
            tmp,
            name="added",
            seed=31,
            trainable_token_indices=ADDED,
            modules_to_save=["lm_head"],
        ),
        "head": make_adapter(base, "lora", tmp, name="head", seed=32, modules_to_save=["lm_head"]),
        "plain": make_adapter(base, "lora", tmp, name="plain", seed=33),
        "tt": make_adapter(base, "trainable_tokens", tmp, name="tt", seed=34),
        "alora": make_adapter(
            base,
            "lora",
            tmp,
            name="alora",
            seed=35,
            task_type="CAUSAL_LM",
            alora_invocation_tokens=INVOCATION,
        ),
    }
    out = tmp / "bundle"
    export_bundle(
        InMemoryBase(base),
        [("added", dirs["added"]), ("plain", dirs["plain"]), ("alora", dirs["alora"])],
        out=out,
        mode="runtime",
        planners=[plan_lora_banks],
        options={"slots": 6, "head_rank": 64, "token_rows": 4},
    )
    for name in ("head", "tt"):
        add_adapter(out, name, dirs[name])
    return base, resized, dirs, out


def _peft(base, folder):
    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


def _greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """PEFT's own forward over the whole sequence each step (no cache): ids and logits."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([ids])).logits[0, -1].numpy()
            logits.append(last)
            ids.append(int(last.argmax()))
    return ids[len(prompt) :], logits


def _generate(bundle, prompts, adapters):
    """Greedy ids per row and every step's logits per row, from one mixed batch."""
    logits = [[] for _ in prompts]

    def keep(event):
        logits[event.row].append(event.logits.copy())

    result = bundle.generate(
        prompts, adapters=adapters, max_new_tokens=STEPS, ignore_eos=True, stream=keep
    )
    return result.token_ids, logits


def test_mixed_batch_each_row_equals_peft(served):
    base, resized, dirs, out = served
    bundle = load_bundle(out, threads=1)
    assert bundle.manifest.vocab_size == BASE_VOCAB + len(ADDED)
    rows = ["added", "head", "tt", "plain", "alora", None]
    prompts = [
        [5, 260, 7, 262, 9, 261],
        [11, 12, 13, 14],
        [5, 6, 7, 8, 30],
        [50, 60, 70],
        [8, 9, *INVOCATION, 10],
        [100, 101, 102, 103, 104],
    ]
    got_ids, got_logits = _generate(bundle, prompts, rows)
    for row, name in enumerate(rows):
        model = base if name is None else _peft(resized if name == "added" else base, dirs[name])
        want_ids, want_logits = _greedy(model, prompts[row], STEPS)
        assert got_ids[row] == want_ids, name
        for step, want in enumerate(want_logits):
            got = got_logits[row][step][: want.shape[0]]
            assert np.abs(got - want).max() <= TOL, f"{name} step {step}"


def test_rows_without_added_tokens_cannot_feed_them(served):
    _, _, _, out = served
    bundle = load_bundle(out, threads=1)
    with pytest.raises(InferenceError, match="only an adapter that adds tokens"):
        bundle.generate([[5, 260]], adapters="plain", max_new_tokens=1)


def test_merged_added_tokens_equals_peft(served, tmp_path):
    base, resized, dirs, _ = served
    out = tmp_path / "merged"
    export_bundle(InMemoryBase(base), [("added", dirs["added"])], out=out, mode="merged")
    bundle = load_bundle(out, threads=1)
    prompt = [5, 260, 7, 262, 9, 261]
    got_ids, got_logits = _generate(bundle, [prompt], [None])
    want_ids, want_logits = _greedy(_peft(resized, dirs["added"]), prompt, STEPS)
    assert got_ids[0] == want_ids
    for got, want in zip(got_logits[0], want_logits, strict=True):
        assert np.abs(got - want).max() <= TOL


def test_bundles_without_the_inputs_refuse_token_and_alora_adapters(served, tmp_path):
    base, _, dirs, out = served
    manifest = load_manifest(out)
    inputs = {t.name for t in manifest.graph.inputs}
    lora_only = inputs - {*tk.TOKEN_BANKS, tk.ALORA_START}
    for name, match in (("head", "no token banks"), ("alora", "re-export with --alora")):
        source = read_adapter(dirs[name], name=name, base=base)
        check_fits_layout(source, manifest.adapters, inputs)
        with pytest.raises(ExportError, match=match):
            check_fits_layout(source, manifest.adapters, lora_only)
    with pytest.raises(ExportError, match="activated LoRA"):
        export_bundle(
            InMemoryBase(base), [("alora", dirs["alora"])], out=tmp_path / "m", mode="merged"
        )


def test_conversation_switches_from_base_to_alora_keeping_its_cache(served):
    base, _, dirs, out = served
    bundle = load_bundle(out, threads=1)
    steps, logits = [], []
    run = bundle.backend.run

    def recording(binding, feeds, outputs, kv=None):
        done = run(binding, feeds, outputs, kv)
        past = {**feeds, **(kv.views()[0] if kv is not None else {})}[names.past_key(0)]
        steps.append((np.array(feeds[names.INPUT_IDS]), past.shape[2], feeds))
        logits.append(outputs[names.LOGITS].numpy()[0, -1].copy())
        return done

    bundle.backend.run = recording
    greedy = SamplingOptions(max_new_tokens=STEPS, ignore_eos=True)
    prompt = [5, 17, 29, 33, 71, 12]
    with Conversation(bundle, capacity=64) as chat:
        first = chat.generate(prompt, options=greedy)
        want_first, _ = _greedy(base, prompt, STEPS)
        assert first.token_ids == want_first
        cached = chat.cached
        assert cached == len(prompt) + STEPS - 1  # the last reply token is not fed yet
        steps.clear()
        logits.clear()
        second = chat.generate(INVOCATION, adapter="alora", options=greedy)
        history = prompt + want_first + INVOCATION
        want_second, want_logits = _greedy(_peft(base, dirs["alora"]), history, STEPS)
        assert second.token_ids == want_second
        for got, want in zip(logits, want_logits, strict=True):
            assert np.abs(got[: want.shape[0]] - want).max() <= TOL
        ids, past, feeds = steps[0]
        # No recomputation: the first step feeds the unfed reply token and the invocation only.
        assert past == cached
        assert ids.tolist() == [[want_first[-1], *INVOCATION]]
        assert int(feeds[tk.ALORA_START][0]) == len(prompt) + STEPS
        assert [s[1] for s in steps[1:]] == list(range(cached + 4, cached + 4 + STEPS - 1))
        with pytest.raises(InferenceError, match="only an activated LoRA takes over"):
            chat.generate([9], adapter="plain", options=greedy)
        chat.rewind(len(prompt))
        third = chat.generate(want_first, adapter="alora", options=greedy)
        assert chat.cached == len(prompt) + STEPS + STEPS - 1
        # The invocation is gone: aLoRA computes the base model, as PEFT does without it.
        want_third, _ = _greedy(_peft(base, dirs["alora"]), prompt + want_first, STEPS)
        assert third.token_ids == want_third


def test_cpp_runtime_refuses_the_bundle_when_it_opens(served):
    from test_cpp_runtime import CppRuntime, build_cpp

    _, _, _, out = served
    with pytest.raises(
        RuntimeError, match=r"graph input '(tokens\.|alora_start).* not fed by the C.. runtime"
    ):
        CppRuntime(build_cpp(), out)


def test_cli_export_and_verify_a_token_bundle(served, tmp_path):
    _, _, dirs, _ = served
    base = save_tiny_base("llama", tmp_path / "base")
    bundle = tmp_path / "cli"
    adapters = [a for n in ("added", "head") for a in ("--adapter", f"{n}={dirs[n]}")]
    args = ("--base", str(base), "--mode", "runtime", *adapters, "--out", str(bundle))
    assert run_cli("export", *args, "--slots", "3") == 0
    assert run_cli("verify", str(bundle), "--prompt", "hello", "--max-new-tokens", "4") == 0
    report = json.loads((bundle / names.PARITY_REPORT).read_text())
    assert [a["adapter"] for a in report["adapters"]] == [None, "added", "head"]
    assert all(a["prefill_logits"]["max_abs"] <= TOL for a in report["adapters"])
