"""Mixed-adapter batches, adapters added later, ORT's own adapter format, concurrent serving.

One tiny Llama runtime bundle (module-scoped) accepting lora, dora and ia3 at r_max 8.
"""

from __future__ import annotations

import copy
import random
import threading

import numpy as np
import onnxruntime as ort
import pytest
import torch
from peft import PeftModel

from peft_export.bundle import names
from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.adapter_store import AdapterStore
from peft_export.runtime.adapters_provider import LoraBankProvider
from peft_export.runtime.session import load_bundle
from tests.ort_graph import OrtGraph
from tests.tiny import make_adapters, tiny_model

TOL = 1e-4
ROWS = {
    "r2": ("lora", {"r": 2, "lora_alpha": 4}),
    "r4": ("lora", {"r": 4}),
    "r8": ("lora", {"r": 8, "lora_alpha": 16}),
    "rs": ("rslora", {"r": 6}),
    "do": ("dora", {}),
    "ia": ("ia3", {}),
    "ad": ("adalora", {}),
}
BATCH = ["r2", "r4", "r8", "rs", "do", "ia", "ad", None]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("mixed")
    dirs = make_adapters(base, ROWS, tmp, first_seed=10)
    out = tmp / "bundle"
    export_bundle(
        InMemoryBase(base),
        [(n, dirs[n]) for n in ("r2", "do", "ia")],
        out=out,
        mode="runtime",
        planners=[plan_lora_banks],
        options={"max_rank": 8, "slots": 8, "methods": "lora,rslora,dora,ia3,adalora"},
    )
    for name in ("r4", "r8", "rs", "ad"):
        add_adapter(out, name, dirs[name])
    return base, dirs, out


def _prompts(batch: int) -> np.ndarray:
    return np.random.default_rng(0).integers(4, 250, size=(batch, 6))


def _run(bundle, store, adapters, prompts, steps=2) -> list[np.ndarray]:
    lease = store.acquire(adapters)
    feeds = {k: v.numpy() for k, v in store.feeds().items()}
    feeds[names.ADAPTER_IDS] = lease.ids
    graph = OrtGraph(bundle, feeds)
    graph.reset(batch=len(adapters))
    outs = [graph.step(prompts)]
    for _ in range(steps):
        outs.append(graph.step(outs[-1][:, -1].argmax(-1)[:, None]))
    store.release(lease)
    return outs


def test_mixed_batch_equals_each_row_alone_and_merged_peft(mixed):
    base, dirs, bundle = mixed
    store = AdapterStore(bundle, load_manifest(bundle))
    prompts = _prompts(len(BATCH))
    batch_out = _run(bundle, store, BATCH, prompts)
    for row, name in enumerate(BATCH):
        alone = _run(bundle, store, [name], prompts[row : row + 1])
        for step, (b, a) in enumerate(zip(batch_out, alone, strict=True)):
            assert np.abs(b[row : row + 1] - a).max() <= TOL, f"row {name} step {step}"
        model = base if name is None else _merged(base, dirs[name])
        with torch.no_grad():
            want = model(torch.tensor(prompts[row : row + 1])).logits.numpy()
        assert np.abs(batch_out[0][row : row + 1] - want).max() <= TOL, f"row {name} vs PEFT"


def test_mixed_batch_equals_peft_adapter_names_forward(mixed):
    base, dirs, bundle = mixed
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), dirs["r2"], adapter_name="r2")
    for name in ("r4", "r8", "rs"):
        peft_model.load_adapter(dirs[name], adapter_name=name)
    peft_model.eval()
    rows = ["r2", "r4", "r8", "rs", None]
    prompts = _prompts(len(rows))
    with torch.no_grad():
        want = peft_model(
            input_ids=torch.tensor(prompts),
            adapter_names=[n or "__base__" for n in rows],
        ).logits.numpy()
    store = AdapterStore(bundle, load_manifest(bundle))
    got = _run(bundle, store, rows, prompts, steps=0)[0]
    assert np.abs(got - want).max() <= TOL


def test_onnx_runtime_adapter_format(mixed):
    base, dirs, bundle = mixed
    add_adapter(bundle, "r4", dirs["r4"], replace=True, onnx_adapter=True)
    path = bundle / "adapters" / "r4.onnx_adapter"
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    manifest = load_manifest(bundle)
    prompts = _prompts(1)
    kv = manifest.kv
    empty = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), dtype=np.float32)
    feeds = {
        names.INPUT_IDS: prompts,
        names.ATTENTION_MASK: np.ones_like(prompts),
        names.POSITION_IDS: np.arange(prompts.shape[1])[None],
        names.ADAPTER_IDS: np.ones(1, dtype=np.int64),
    }
    for layer in range(kv.num_layers):
        feeds[names.past_key(layer)] = empty
        feeds[names.past_value(layer)] = empty
    # InferenceSession.run checks in Python that every graph input is fed, before ONNX Runtime
    # would add the adapter's tensors; the C/C++ API has no such check, so call its binding.
    got = session._sess.run([names.LOGITS], feeds, options)[0]
    with torch.no_grad():
        want = _merged(base, dirs["r4"])(torch.tensor(prompts)).logits.numpy()
    assert np.abs(got - want).max() <= TOL


def test_concurrent_requests_while_adapters_are_loaded_and_evicted(mixed):
    _, _, bundle = mixed
    loaded = load_bundle(bundle, threads=1)
    provider = next(p for p in loaded.input_providers if isinstance(p, LoraBankProvider))
    store = AdapterStore(bundle, loaded.manifest, slots=3)
    provider.store = store
    choices = [None, "r2", "r4", "r8", "rs", "do", "ia", "ad"]
    prompt = [5, 77, 130, 9]
    reference = {
        name: loaded.generate(prompt, adapters=name, max_new_tokens=3, ignore_eos=True).token_ids
        for name in choices
    }
    assert len({tuple(map(tuple, v)) for v in reference.values()}) > 1
    failures: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(100):
            name = rng.choice(choices)
            got = loaded.generate(prompt, adapters=name, max_new_tokens=3, ignore_eos=True)
            if got.token_ids != reference[name]:
                failures.append(f"{name}: {got.token_ids} != {reference[name]}")

    def churn() -> None:
        rng = random.Random(99)
        while not stop.is_set():
            name = rng.choice(choices[1:])
            store.drop(name) if rng.random() < 0.5 else store.load(name)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    churner = threading.Thread(target=churn)
    churner.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    churner.join()
    assert not failures, failures[:3]
    assert store.swaps > 10


def _merged(base, adapter_dir):
    return PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload().eval()


@pytest.mark.parametrize("retains", [True, False])
def test_banks_are_bound_once_per_binding_where_the_backend_keeps_them(mixed, retains):
    _, _, bundle_dir = mixed
    bundle = load_bundle(bundle_dir, threads=1)
    bundle.backend.retains_inputs = retains
    banks = set(bundle.fixed_feeds())
    assert banks and all(name.startswith("lora.") for name in banks)
    calls: list[set[str]] = []
    run = bundle.backend.run

    def recording_run(binding, feeds, outputs, kv=None):
        calls.append(set(feeds))
        run(binding, feeds, outputs, kv)

    bundle.backend.run = recording_run
    first = bundle.generate([[5, 6, 7]], adapters="r4", max_new_tokens=4, ignore_eos=True)
    second = bundle.generate([[5, 6, 7]], adapters="do", max_new_tokens=4, ignore_eos=True)
    with_banks = [bool(banks & fed) for fed in calls]
    assert all(names.ADAPTER_IDS in fed for fed in calls)
    assert with_banks == ([True] + [False] * (len(calls) - 1) if retains else [True] * len(calls))
    assert first.token_ids != second.token_ids
