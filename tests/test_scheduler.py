"""The continuous-batching scheduler against the same requests run alone (issue 24 item 1).

One tiny Llama runtime bundle (module-scoped) serves LoRA, DoRA, IA3, prefix tuning, prompt
tuning and LLaMA-Adapter rows plus base rows. Requests arrive at random times from several
threads, some are cancelled or time out; every completed one must equal `Bundle.generate` on
that request alone, and afterwards no slot is pinned and the KV pool is empty.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from tiny import make_adapter, save_tiny_tokenizer, tiny_model

from peft_export.bundle import names
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.prompt_adapters.planner import plan_prompt_inputs
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime.errors import InferenceError
from peft_export.runtime.scheduler import (
    ContextLengthError,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
    SchedulerConfig,
    ServeRequest,
    UnknownAdapterError,
)
from peft_export.runtime.session import load_bundle

ADAPTERS = {
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "ia3": ("ia3", {}),
    "prefix": ("prefix_tuning", {"num_virtual_tokens": 6}),
    "prompt": ("prompt_tuning", {"num_virtual_tokens": 5}),
    "adaption": ("adaption_prompt", {"adapter_len": 3}),
}
ROW_ADAPTERS = [None, *ADAPTERS]
ENDED_EARLY = ("cancelled", "timeout")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sched")
    base = tiny_model("llama")
    dirs = {
        name: make_adapter(base, method, tmp / "adapters", name=name, seed=30 + i, **overrides)
        for i, (name, (method, overrides)) in enumerate(ADAPTERS.items())
    }
    out = tmp / "bundle"
    export_bundle(
        InMemoryBase(base, save_tiny_tokenizer(tmp / "tokenizer")),
        list(dirs.items()),
        out=out,
        mode="runtime",
        planners=[plan_lora_banks, plan_prompt_inputs],
        options={"slots": 8, "methods": "lora,dora,ia3", "prefix_max_len": 8},
    )
    return out


def _random_request(rng: random.Random, adapters: list[str | None], i: int) -> ServeRequest:
    length = rng.choice([rng.randint(1, 12), rng.randint(12, 48), rng.randint(60, 150)])
    sampled = rng.random() < 0.1
    return ServeRequest(
        prompt_ids=[rng.randint(4, 259) for _ in range(length)],
        adapter=rng.choice(adapters),
        max_tokens=rng.randint(1, 14),
        temperature=0.8 if sampled else 0.0,
        top_p=0.9 if sampled else 1.0,
        seed=i if sampled else None,
        stop_token_ids=(rng.randint(4, 259),) if rng.random() < 0.2 else (),
        ignore_eos=rng.random() < 0.5,
        timeout_s=rng.uniform(0.002, 0.05) if rng.random() < 0.03 else None,
        request_id=f"r{i}",
    )


def _alone(bundle, request: ServeRequest) -> list[int]:
    return bundle.generate(
        list(request.prompt_ids),
        adapters=request.adapter,
        max_new_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
    ).token_ids[0]


def _traffic(scheduler, requests, rng, *, cancel_share=0.1, threads=3):
    """Submit from `threads` threads at random times; cancel some after a random delay.
    Returns (handle, streamed token ids) per request, in request order."""
    handles: list = [None] * len(requests)
    streamed: list[list[int]] = [[] for _ in requests]
    delays = [rng.expovariate(1 / 0.002) for _ in requests]
    cancels = {i: rng.uniform(0, 0.02) for i in range(len(requests)) if rng.random() < cancel_share}

    def consume(i: int) -> None:
        for event in handles[i].events(timeout=60):
            if event.token_id is not None:
                streamed[i].append(event.token_id)

    def submit(part: list[int]) -> None:
        consumers = []
        for i in part:
            time.sleep(delays[i])
            handles[i] = scheduler.submit(requests[i])
            if i in cancels:
                timer = threading.Timer(cancels[i], handles[i].cancel)
                timer.start()
                consumers.append(timer)
        for i in part:
            consume(i)
        for timer in consumers:
            timer.join()

    workers = [
        threading.Thread(target=submit, args=(list(range(k, len(requests), threads)),))
        for k in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert not worker.is_alive(), "a client hung"
    return handles, streamed


def _assert_drained(scheduler) -> None:
    metrics = scheduler.metrics()
    assert scheduler.idle()
    assert metrics["queue_depth"] == metrics["running_rows"] == metrics["prefilling_rows"] == 0
    pool = metrics["kv_pool"]
    assert pool["reserved_tokens"] == pool["reserved_rows"] == 0
    assert pool["layout_tokens"] == pool["rows"] == 0
    assert metrics["adapters"]["slots"]["pinned"] == 0
    assert scheduler.pager.store.pinned() == 0


def test_random_traffic_equals_each_request_alone(bundle_dir):
    bundle = load_bundle(bundle_dir, threads=1)
    rng = random.Random(24)
    requests = [_random_request(rng, ROW_ADAPTERS, i) for i in range(520)]
    config = SchedulerConfig(
        max_rows=8,
        kv_pool_tokens=8 * 120,
        prefill_pool_tokens=256,
        step_token_budget=64,
        max_queue=1024,
        max_wait_s=0.05,
        host_cache_adapters=2,
    )
    with Scheduler(bundle, config) as scheduler:
        handles, streamed = _traffic(scheduler, requests, rng)
        results = [h.result(timeout=60) for h in handles]
        for _ in range(100):
            if scheduler.idle():
                break
            time.sleep(0.01)
        _assert_drained(scheduler)
        metrics = scheduler.metrics()
    reasons = [r.finish_reason for r in results]
    completed = [i for i, r in enumerate(reasons) if r not in ENDED_EARLY]
    assert "error" not in reasons, [r.error for r in results if r.error]
    assert len(completed) >= 400, f"only {len(completed)} completed"
    assert sum(r == "cancelled" for r in reasons) >= 10
    assert metrics["kv_pool"]["trims"] and metrics["kv_pool"]["widenings"]
    assert max(metrics["steps"].values()) > 0
    chunked = [i for i in completed if len(requests[i].prompt_ids) > config.step_token_budget]
    assert chunked, "no long prompt was prefilled in chunks"
    mismatched = []
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        assert streamed[i] == result.token_ids, request.request_id
        want = _alone(bundle, request)
        if i in completed:
            if result.token_ids != want:
                mismatched.append((request.request_id, request.adapter, want, result.token_ids))
        else:
            assert want[: len(result.token_ids)] == result.token_ids, request.request_id
    assert not mismatched, mismatched[:5]
    for adapter in ROW_ADAPTERS:
        assert any(requests[i].adapter == adapter for i in completed)


def _variants(bundle_dir, out_dir, count: int):
    """`count` LoRA files made from the bundle's `lora` file, B scaled per copy."""
    source = bundle_dir / names.adapter_file("lora")
    with safe_open(str(source), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    out_dir.mkdir()
    paths = {}
    for k in range(count):
        scale = np.float32(0.2 + 0.02 * k)
        scaled = {n: (t * scale if n.endswith(".B") else t) for n, t in tensors.items()}
        path = out_dir / f"v{k}.safetensors"
        save_file(scaled, str(path), metadata=meta)
        paths[f"v{k}"] = path
    return paths


def test_paging_200_adapters_through_8_slots(bundle_dir, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_dir, root)
    bundle = load_bundle(root, threads=1)
    config = SchedulerConfig(max_rows=16, kv_pool_tokens=16 * 64, host_cache_adapters=24)
    scheduler = Scheduler(bundle, config)
    variants = _variants(bundle_dir, tmp_path / "variants", 200)
    assert scheduler.register("v0", variants.pop("v0")) == "lora"
    assert set(scheduler.register_many(variants).values()) == {"lora"}
    assert len(scheduler.names()) == 200 + len(ADAPTERS)
    rng = random.Random(7)
    pool = [f"v{k}" for k in range(200)]
    requests = [
        ServeRequest(
            prompt_ids=[rng.randint(4, 259) for _ in range(rng.randint(1, 24))],
            adapter=rng.choice(pool),
            max_tokens=rng.randint(1, 8),
            ignore_eos=True,
        )
        for _ in range(300)
    ]
    with scheduler:
        handles, _ = _traffic(scheduler, requests, rng, cancel_share=0.0)
        results = [h.result(timeout=60) for h in handles]
        _assert_drained(scheduler)
        tiers = scheduler.metrics()["adapters"]
    assert {r.finish_reason for r in results} == {"length"}
    for request, result in zip(requests[:100], results, strict=False):
        assert result.token_ids == _alone(bundle, request), request.adapter
    slots, host = tiers["slots"], tiers["host"]
    assert slots["capacity"] == 7
    assert slots["hits"] + slots["misses"] == len(requests)
    assert host["hits"] + host["misses"] == slots["misses"]
    assert slots["evictions"] >= slots["misses"] - slots["capacity"]
    assert host["evictions"] > 0 and host["size"] <= config.host_cache_adapters + 7

    later = Scheduler(bundle, config)
    queued = later.submit(ServeRequest([5, 6], adapter="v1", max_tokens=2))
    later.unregister("v1")
    assert "v1" not in later.names()
    with pytest.raises(UnknownAdapterError, match="'v1'"):
        later.submit(ServeRequest([5, 6], adapter="v1", max_tokens=2))
    kept = later.submit(ServeRequest([5, 6], adapter="v2", max_tokens=2))
    while not kept.done():
        later.step()
    assert queued.result(timeout=0).finish_reason == "error"
    assert "v1" in queued.result(timeout=0).error
    assert kept.result(timeout=0).finish_reason in ("length", "eos")
    later.close()


def test_refusals_name_the_problem(bundle_dir):
    bundle = load_bundle(bundle_dir, threads=1)
    config = SchedulerConfig(max_rows=2, kv_pool_tokens=64, prefill_pool_tokens=64, max_queue=2)
    scheduler = Scheduler(bundle, config)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        scheduler.submit(ServeRequest([5, 6], adapter="nope"))
    with pytest.raises(ContextLengthError, match="KV pool"):
        scheduler.submit(ServeRequest([5] * 60, max_tokens=10))
    with pytest.raises(InferenceError, match="top_p"):
        scheduler.submit(ServeRequest([5], top_p=0.0))
    with pytest.raises(InferenceError, match="empty"):
        scheduler.submit(ServeRequest([]))
    with pytest.raises(InferenceError, match="outside"):
        scheduler.submit(ServeRequest([100000]))
    done = scheduler.submit(ServeRequest([5], max_tokens=0))
    assert done.result(timeout=1).finish_reason == "length"
    first = scheduler.submit(ServeRequest([5, 6], max_tokens=4))
    scheduler.submit(ServeRequest([7], max_tokens=4))
    with pytest.raises(QueueFullError, match="queue is full"):
        scheduler.submit(ServeRequest([8], max_tokens=4))
    first.cancel()
    assert first.result(timeout=1).finish_reason == "cancelled"
    scheduler.close()
    with pytest.raises(SchedulerClosedError):
        scheduler.submit(ServeRequest([5], max_tokens=4))
    assert scheduler.metrics()["requests"]["rejected"] == 1


def test_timeout_and_cancel_free_the_row(bundle_dir):
    bundle = load_bundle(bundle_dir, threads=1)
    scheduler = Scheduler(bundle, SchedulerConfig(max_rows=4, kv_pool_tokens=4 * 300))
    slow = scheduler.submit(
        ServeRequest([9] * 20, adapter="lora", max_tokens=200, timeout_s=0.05, ignore_eos=True)
    )
    kept = scheduler.submit(ServeRequest([9] * 20, adapter="dora", max_tokens=200, ignore_eos=True))
    scheduler.step()
    scheduler.step()
    time.sleep(0.06)
    scheduler.step()
    assert slow.result(timeout=0).finish_reason == "timeout"
    assert len(slow.result(timeout=0).token_ids) >= 2
    assert scheduler.metrics()["running_rows"] == 1
    kept.cancel()
    scheduler.step()
    assert kept.result(timeout=0).finish_reason == "cancelled"
    _assert_drained(scheduler)


def test_asyncio_consumer_gets_the_same_stream(bundle_dir):
    bundle = load_bundle(bundle_dir, threads=1)
    request = ServeRequest([40, 41, 42, 43], adapter="prefix", max_tokens=6, ignore_eos=True)

    async def run() -> tuple[list[int], str, list[int]]:
        with Scheduler(bundle, SchedulerConfig(max_rows=2, kv_pool_tokens=256)) as scheduler:
            handle = scheduler.submit(request)
            tokens, text = [], ""
            async for event in handle.aevents():
                if event.token_id is not None:
                    tokens.append(event.token_id)
                text += event.text
            result = await handle.aresult()
            assert result.text == text
            return tokens, text, result.token_ids

    tokens, _, result_ids = asyncio.run(run())
    assert tokens == result_ids == _alone(bundle, request)
