"""Concurrency soak: 16 threads, 2000 requests, random adapters, while adapters come and go.

One shared runtime bundle with 3 usable bank slots serves 7 adapters, so slots are evicted
and rewritten constantly. Meanwhile a churn thread drops and reloads adapters through the
store's public API, and `adapters add` / `adapters remove` change the bundle on disk (the store
picks the new adapter up from the manifest). Every row of every request must equal the
single-threaded reference of the same request (same prompts, same adapters, same batch).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import threading
import time

import pytest
from lora_bundles import lora_bundle
from tiny import make_adapter, tiny_model

from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter, remove_adapter
from peft_export.runtime import load_bundle
from peft_export.runtime.adapters_provider import LoraBankProvider

THREADS = 16
REQUESTS = 2000
NEW_TOKENS = 3
NAMES = [f"a{i}" for i in range(6)]
PROMPTS = [[5, 77, 130, 9], [40, 41, 42], [200, 3, 17, 99, 12], [8]]


@pytest.fixture(scope="module")
def soak_bundle(tmp_path_factory):
    """Runtime bundle (q/v banks, 4 slots), adapters a0..a5 installed; `late` and `gone` folders."""
    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("soak")
    qv = {"target_modules": ["q_proj", "v_proj"]}
    dirs = {
        name: make_adapter(base, "lora", tmp, name=name, seed=30 + i, **qv)
        for i, name in enumerate([*NAMES, "late", "gone"])
    }
    out = lora_bundle(base, tmp / "bundle", "a0", {n: dirs[n] for n in NAMES}, slots=4)
    return out, dirs


Request = tuple[tuple[tuple[int, ...], ...], tuple[str | None, ...]]


def _requests(rng: random.Random, count: int, names: list[str | None]) -> list[Request]:
    """(prompts, adapters) of single rows and two-row batches with different adapters."""
    pool = [((tuple(p),), (a,)) for p in PROMPTS for a in names]
    for _ in range(12):
        first, second = rng.sample(names, 2)
        pool.append(((tuple(rng.choice(PROMPTS)), tuple(rng.choice(PROMPTS))), (first, second)))
    return [rng.choice(pool) for _ in range(count)]


def _generate(bundle, request: Request) -> list[list[int]]:
    prompts, adapters = request
    result = bundle.generate(
        [list(p) for p in prompts],
        adapters=list(adapters),
        max_new_tokens=NEW_TOKENS,
        ignore_eos=True,
    )
    return result.token_ids


def test_soak_16_threads_2000_requests(soak_bundle):
    root, dirs = soak_bundle
    names: list[str | None] = [None, *NAMES]
    served = load_bundle(root, threads=1)
    store = next(p for p in served.input_providers if isinstance(p, LoraBankProvider)).store
    assert store.slots - 1 < len(NAMES), "more adapters than slots, so slots get rewritten"
    add_adapter(root, "gone", dirs["gone"])

    plan = _requests(random.Random(7), REQUESTS, names)
    late_plan = _requests(random.Random(8), 100, ["late", *names[:3]])
    single = load_bundle(root, threads=1)
    reference = {request: _generate(single, request) for request in set(plan)}
    assert len({str(v) for v in reference.values()}) > len(names), "adapters must matter"

    late_added = threading.Event()
    stop = threading.Event()
    mismatches: list[str] = []
    errors: list[str] = []
    late_served = []
    counter = iter(range(REQUESTS))
    lock = threading.Lock()

    def client(seed: int) -> None:
        local = random.Random(seed)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            use_late = late_added.is_set() and local.random() < 0.2
            request = local.choice(late_plan) if use_late else plan[index]
            try:
                got = _generate(served, request)
            except Exception as exc:  # noqa: BLE001 (counted and reported, never hidden)
                errors.append(f"{request}: {type(exc).__name__}: {exc}")
                continue
            want = reference[request] if request in reference else late_reference[request]
            late_served.append(use_late)
            if got != want:
                mismatches.append(f"{request}: {got} != {want}")

    def churn() -> None:
        local = random.Random(99)
        while not stop.is_set():
            name = local.choice(NAMES)
            store.drop(name) if local.random() < 0.5 else store.load(name)
            time.sleep(0.001)

    late_reference: dict[Request, list[list[int]]] = {}

    def disk_changes() -> None:
        """Reference for `late` from a copy, then add it to the served bundle, remove `gone`."""
        copy = shutil.copytree(root, root.with_name("late-reference"))
        add_adapter(copy, "late", dirs["late"])
        alone = load_bundle(copy, threads=1)
        late_reference.update({r: _generate(alone, r) for r in set(late_plan)})
        add_adapter(root, "late", dirs["late"])
        remove_adapter(root, "gone")
        late_added.set()

    start = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(THREADS)]
    helpers = [threading.Thread(target=churn), threading.Thread(target=disk_changes)]
    for thread in helpers + workers:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    for thread in helpers:
        thread.join()
    elapsed = time.perf_counter() - start

    print(
        f"soak: {THREADS} threads, {REQUESTS} requests in {elapsed:.1f} s "
        f"({REQUESTS / elapsed:.0f} req/s), {sum(late_served)} used the adapter added "
        f"on disk, {store.swaps} slot writes, {len(mismatches)} mismatches, {len(errors)} errors"
    )
    assert not errors, errors[:3]
    assert not mismatches, mismatches[:3]
    assert late_added.is_set() and any(late_served), "the adapter added on disk was served"
    assert store.swaps > 50, "slots must have been rewritten while requests ran"


def test_concurrent_adapters_add_lose_nothing(soak_bundle, tmp_path):
    """Writers take turns on the bundle: adds from 6 threads at once all land, consistently."""
    root, dirs = soak_bundle
    bundle = shutil.copytree(root, tmp_path / "bundle")
    names = [f"c{i}" for i in range(6)]
    errors: list[str] = []

    def add(name: str) -> None:
        try:
            add_adapter(bundle, name, dirs[NAMES[int(name[1:])]])
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(f"{name}: {exc}")

    threads = [threading.Thread(target=add, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    installed = load_bundle(bundle, threads=1).manifest.adapters.installed
    assert set(names) <= set(installed)
    for name in names:
        digest = hashlib.sha256((bundle / installed[name].file).read_bytes()).hexdigest()
        assert digest == installed[name].sha256
