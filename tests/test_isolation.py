"""Runtime isolation: requests on one shared Bundle cannot disturb each other.

- a request's adapter selection is fixed when it starts: changing the request's list, or
  another request with other adapters, does not change its rows;
- an adapter a running request uses is never evicted or dropped, whatever others ask for;
- a request that fails (bad input, a failing input provider, a stream callback raising, a
  damaged adapter file) leaves nothing pinned or half-set, and the next good request on the
  same Bundle gives the reference output.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from lora_bundles import lora_bundle
from safetensors import safe_open
from safetensors.numpy import save_file
from tiny import make_adapter, tiny_model

from peft_export.runtime import InferenceError, InputProvider, load_bundle
from peft_export.runtime.adapters_provider import LoraBankProvider

PROMPT = [5, 77, 130, 9]
NEW = 4


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """Runtime bundle: q/v banks, 3 slots (2 usable), adapters a0, a1, a2 and a broken one."""
    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("isolation")
    qv = {"target_modules": ["q_proj", "v_proj"]}
    names = ("a0", "a1", "a2", "broken")
    dirs = {
        n: make_adapter(base, "lora", tmp, name=n, seed=40 + i, **qv) for i, n in enumerate(names)
    }
    out = lora_bundle(base, tmp / "bundle", "a0", dirs, slots=3)
    broken = out / "adapters" / "broken.safetensors"
    with safe_open(str(broken), "numpy") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    first = sorted(tensors)[0]
    tensors[first] = np.full_like(tensors[first], np.nan)
    save_file(tensors, str(broken), metadata=metadata)
    return out


@pytest.fixture
def served(bundle_dir):
    return load_bundle(bundle_dir, threads=1)


@pytest.fixture(scope="module")
def reference(bundle_dir):
    """Single-request outputs of a separately loaded Bundle."""
    alone = load_bundle(bundle_dir, threads=1)
    out = {
        name: alone.generate(PROMPT, adapters=name, max_new_tokens=NEW, ignore_eos=True).token_ids
        for name in (None, "a0", "a1", "a2")
    }
    assert len({str(v) for v in out.values()}) == 4, "every adapter must change the output"
    return out


def _store(bundle):
    return next(p for p in bundle.input_providers if isinstance(p, LoraBankProvider)).store


def _gen(bundle, adapter, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW)
    return bundle.generate(PROMPT, adapters=adapter, ignore_eos=True, **kwargs).token_ids


def test_selection_is_fixed_when_the_request_starts(served, reference):
    adapters = ["a0"]

    def meddle(event):
        adapters[0] = "a1"  # the caller's list, changed mid-request
        assert _gen(served, "a2", max_new_tokens=1) == [reference["a2"][0][:1]]

    result = served.generate(
        PROMPT, adapters=adapters, max_new_tokens=NEW, ignore_eos=True, stream=meddle
    )
    assert result.token_ids == reference["a0"]


def test_adapter_in_use_is_never_evicted(served, reference):
    store = _store(served)
    store.wait_timeout_s = 0.3
    paused, resume = threading.Event(), threading.Event()
    results = {}

    def hold(event):
        if not paused.is_set():
            paused.set()
            assert resume.wait(30)

    def long_request():
        results["a0"] = _gen(served, "a0", stream=hold)

    worker = threading.Thread(target=long_request)
    worker.start()
    assert paused.wait(30)
    slot = store.resident()["a0"]
    bank = next(name for name in store.specs if name.endswith(".B"))
    before = store.bank(bank)[slot].copy()

    assert store.drop("a0") is False, "a pinned adapter is not dropped"
    assert _gen(served, "a1") == reference["a1"], "the one free slot serves other requests"
    assert _gen(served, "a2") == reference["a2"]
    with pytest.raises(InferenceError, match="stayed in use"):
        served.generate([PROMPT, PROMPT], adapters=["a1", "a2"], max_new_tokens=1)
    assert store.resident()["a0"] == slot
    np.testing.assert_array_equal(store.bank(bank)[slot], before)

    resume.set()
    worker.join()
    assert results["a0"] == reference["a0"]
    assert store.drop("a0") is True


class _FailingProvider(InputProvider):
    """Fails the step of requests whose prompt starts with token 13 (an injected fault)."""

    def inputs(self) -> set[str]:
        return set()

    def step(self, ctx, state) -> None:
        if ctx.prompt_ids[0][0] == 13 and state.index == 1:
            raise RuntimeError("injected failure in a decode step")


def _fail_in_callback(served):
    def boom(event):
        raise ValueError("the caller's stream callback failed")

    served.generate(PROMPT, adapters="a1", max_new_tokens=NEW, stream=boom)


FAILURES = {
    "unknown adapter": (lambda b: _gen(b, "nope"), InferenceError),
    "too long": (lambda b: _gen(b, "a1", max_new_tokens=10_000), InferenceError),
    "token out of vocab": (lambda b: b.generate([[5, 999_999]], adapters="a1"), InferenceError),
    "too many adapters": (
        lambda b: b.generate([PROMPT] * 3, adapters=["a0", "a1", "a2"]),
        InferenceError,
    ),
    "damaged adapter file": (lambda b: _gen(b, "broken"), InferenceError),
    "provider fails mid-request": (lambda b: b.generate([[13, 5, 6]], adapters="a2"), RuntimeError),
    "stream callback raises": (_fail_in_callback, ValueError),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_request_does_not_poison_the_bundle(bundle_dir, reference, failure):
    served = load_bundle(bundle_dir, threads=1)
    served.add_input_provider(_FailingProvider())
    assert _gen(served, "a0") == reference["a0"]
    run, error = FAILURES[failure]
    with pytest.raises(error):
        run(served)
    store = _store(served)
    assert all(store.drop(name) for name in store.resident()), "no slot stays pinned"
    for name in ("a1", "a2", None, "a0"):
        assert _gen(served, name) == reference[name], f"after '{failure}', {name} differs"


def test_failures_interleaved_with_good_requests_from_threads(served, reference):
    served.add_input_provider(_FailingProvider())
    bad = [FAILURES[f][0] for f in FAILURES]
    mismatches, unexpected = [], []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(30):
            if rng.random() < 0.4:
                try:
                    bad[rng.integers(len(bad))](served)
                except (InferenceError, RuntimeError, ValueError):
                    continue
                unexpected.append("a bad request succeeded")
            else:
                name = [None, "a0", "a1", "a2"][rng.integers(4)]
                if _gen(served, name) != reference[name]:
                    mismatches.append(name)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not unexpected and not mismatches, (unexpected[:3], mismatches[:3])
