"""Requests above a bundle's limits are refused with InferenceError before any step runs.

Limits: the model's positions (prefix and prompt-tuning tokens count), the vocabulary, the
bank slots, the prompt-side bounds the bundle was exported with, and, for TensorRT engines,
the optimization profiles (batch, prompt tokens per prefill step, cached past), checked
against the request's extreme steps before any buffer is allocated.
"""

from __future__ import annotations

import functools
import json
import shutil
from types import SimpleNamespace

import pytest
from tiny import make_adapter, save_tiny_tokenizer, tiny_model

from peft_export.bundle.manifest import EngineRecord
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime import InferenceError, load_bundle
from peft_export.runtime.backends.trt import TrtBackend

POSITIONS = 256
PREFIX = 4


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """Runtime bundle: q/v LoRA banks (3 slots, 2 usable; fr, de, es), prefix tuning `pre`."""
    base = tiny_model("llama")
    assert base.config.max_position_embeddings == POSITIONS
    tmp = tmp_path_factory.mktemp("limits")
    qv = {"target_modules": ["q_proj", "v_proj"]}
    lora = {
        n: make_adapter(base, "lora", tmp, name=n, seed=i, **qv)
        for i, n in enumerate(("fr", "de", "es"))
    }
    prefix = make_adapter(base, "prefix_tuning", tmp, name="pre", num_virtual_tokens=PREFIX)
    export_bundle(
        InMemoryBase(base, save_tiny_tokenizer(tmp / "tokenizer")),
        [("fr", lora["fr"]), ("pre", prefix)],
        out=tmp / "bundle",
        mode="runtime",
        planners=[plan_lora_banks, plan_prompt_inputs],
        options={"max_rank": 4, "slots": 3},
    )
    for name in ("de", "es"):
        add_adapter(tmp / "bundle", name, lora[name])
    return tmp / "bundle"


class _CountingRuns:
    """Wraps a backend's `run` to count steps (a refused request must run none)."""

    def __init__(self, bundle) -> None:
        self.calls = 0
        self._run = bundle.backend.run
        bundle.backend.run = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._run(*args, **kwargs)


@pytest.fixture
def served(bundle_dir):
    bundle = load_bundle(bundle_dir, threads=1)
    bundle.runs = _CountingRuns(bundle)
    return bundle


def _refused(bundle, match: str, prompts, **kwargs) -> None:
    before = bundle.runs.calls
    with pytest.raises(InferenceError, match=match):
        bundle.generate(prompts, **kwargs)
    assert bundle.runs.calls == before, "a refused request must not run a step"


def test_model_positions(served):
    ids = list(range(4, 4 + 200))
    _refused(served, "exceeds the model's 256 positions", [ids], max_new_tokens=57)
    assert len(served.generate([ids], max_new_tokens=56).token_ids[0]) <= 56


def test_prefix_tokens_count_against_positions(served):
    ids = list(range(4, 4 + 200))
    served.generate([ids], max_new_tokens=POSITIONS - 200, ignore_eos=True)
    _refused(
        served,
        r"prompt \(204 positions\) \+ max_new_tokens \(56\) exceeds the model's 256",
        [ids],
        adapters="pre",
        max_new_tokens=POSITIONS - 200,
    )
    served.generate([ids], adapters="pre", max_new_tokens=POSITIONS - 200 - PREFIX)


def test_vocabulary(served):
    _refused(served, r"token ids outside \[0, 260\)", [[5, 260]], max_new_tokens=2)
    _refused(served, r"token ids outside", [[5, -1]], max_new_tokens=2)


def test_slots(served):
    _refused(
        served,
        "names 3 different adapters but the banks hold 2",
        [[5, 6]] * 3,
        adapters=["fr", "de", "es"],
        max_new_tokens=2,
    )
    served.generate([[5, 6]] * 3, adapters=["fr", "de", "fr"], max_new_tokens=2)


def test_prompt_side_bound(bundle_dir, tmp_path):
    copy = shutil.copytree(bundle_dir, tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["adapters"]["prefix_max_len"] = PREFIX - 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(copy, threads=1)
    bundle.runs = _CountingRuns(bundle)
    _refused(
        bundle, "has 4 virtual tokens but the bundle allows at most 3", [[5, 6]], adapters="pre"
    )


def test_request_memory(served):
    """A batch whose KV cache cannot be allocated is refused, not a MemoryError traceback."""
    _refused(served, "GiB of KV cache and logits", [[5]] * 1_000_000, max_new_tokens=250)
    assert served.generate([[5, 6]], max_new_tokens=2).token_ids


def _engine(batch=(1, 1, 2), seq=(1, 8, 16), prefill_past=(0, 0, 8), past=(1, 16, 32)):
    prefill = {"batch": list(batch), "seq": list(seq), "past": list(prefill_past)}
    decode = {"batch": list(batch), "seq": [1, 1, 1], "past": list(past)}
    return EngineRecord("engines/x.plan", "tensorrt", "10", "fp32", [prefill, decode])


def _with_engine_profiles(bundle, record: EngineRecord):
    """The TensorRT backend's own check, over this (ORT) bundle: steps that fit still run."""
    bundle.backend.check_steps = functools.partial(
        TrtBackend.check_steps, SimpleNamespace(record=record)
    )
    return bundle


@pytest.mark.parametrize(
    ("prompts", "max_new", "message"),
    [
        ([[5, 6]] * 3, 2, "batch 3 is outside 1..2"),
        ([list(range(4, 24))], 2, "seq 20 is outside 1..16"),
        ([[5, 6, 7]], 40, "past 41 is outside 1..32"),
    ],
    ids=["batch", "prompt", "past"],
)
def test_engine_profiles(served, prompts, max_new, message):
    _with_engine_profiles(served, _engine())
    _refused(served, message, prompts, max_new_tokens=max_new)
    fits = served.generate([[5, 6, 7]] * 2, max_new_tokens=30, ignore_eos=True)
    assert [len(t) for t in fits.token_ids] == [30, 30]


def test_engine_profiles_see_prefill_chunks(bundle_dir):
    """A 20-token prompt in chunks of 8 fits --seq 16, but its third chunk starts at past 16."""
    bundle = load_bundle(bundle_dir, threads=1, prefill_chunk=8)
    bundle.runs = _CountingRuns(bundle)
    _with_engine_profiles(bundle, _engine())
    _refused(bundle, "past 16 is outside 0..8", [list(range(4, 24))], max_new_tokens=2)
    wide = _engine(prefill_past=(0, 0, 16))
    _with_engine_profiles(bundle, wide).generate([list(range(4, 24))], max_new_tokens=2)
