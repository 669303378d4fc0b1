"""Adapter store slots (LRU, pins, in-place writes) and refused adapters (bundle untouched)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from peft_export.bundle.manifest import load_manifest
from peft_export.exporter.cli import main
from peft_export.exporter.errors import ExportError
from peft_export.exporter.pipeline import InMemoryBase, export_bundle
from peft_export.exporter.runtime_adapters.bundle_adapters import add_adapter, remove_adapter
from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
from peft_export.runtime import adapter_store, host_memory
from peft_export.runtime.adapter_store import AdapterStore
from peft_export.runtime.errors import InferenceError
from tests.tiny import make_adapter, tiny_model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """llama bundle with banks on q_proj/v_proj only, r_max 4, --methods lora,dora, 3 slots."""
    base = tiny_model("llama")
    tmp = tmp_path_factory.mktemp("store")
    qv = {"target_modules": ["q_proj", "v_proj"]}
    dirs = {f"a{i}": make_adapter(base, "lora", tmp, name=f"a{i}", seed=i, **qv) for i in range(4)}
    dirs["d"] = make_adapter(base, "dora", tmp, name="d", **qv)
    out = tmp / "bundle"
    export_bundle(
        InMemoryBase(base),
        [("a0", dirs["a0"]), ("d", dirs["d"])],
        out=out,
        mode="runtime",
        planners=[plan_lora_banks],
        options={"max_rank": 4, "slots": 3, "methods": "lora,dora"},
    )
    for name in ("a1", "a2", "a3"):
        add_adapter(out, name, dirs[name])
    return base, tmp, out


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_lru_eviction_pins_and_in_place_writes(small):
    _, _, bundle = small
    store = AdapterStore(bundle, load_manifest(bundle))
    bank = next(k for k in store.specs if k.endswith(".A"))
    pointer = store.bank(bank).ctypes.data
    first = store.acquire(["a0", None, "a1"])
    assert first.ids.tolist() == [1, 0, 2]
    assert store.resident() == {"a0": 1, "a1": 2}
    with pytest.raises(InferenceError, match="slots"):
        store.acquire(["a0", "a1", "a2"])
    store.release(first)
    held = store.acquire(["a1"])
    second = store.acquire(["a2"])
    assert second.ids.tolist() == [1], "a0 is the least recently used unpinned slot"
    assert store.resident() == {"a1": 2, "a2": 1}
    store.release(second)
    store.wait_timeout_s = 0.2
    with pytest.raises(InferenceError, match="in use"):
        store.acquire(["a0", "a3"])
    assert store.drop("a1") is False, "a pinned adapter is never dropped"
    store.release(held)
    assert store.drop("a1") is True
    assert "a1" not in store.held() and "a1" not in store.resident()
    assert store.bank(bank).ctypes.data == pointer
    assert not store.bank(bank)[0].any(), "slot 0 stays the base model"


def test_slot_holds_the_adapter_file_zero_padded(small):
    _, _, bundle = small
    manifest = load_manifest(bundle)
    store = AdapterStore(bundle, manifest)
    lease = store.acquire(["d"])
    tensors = load_file(str(bundle / manifest.adapters.installed["d"].file))
    for name, value in tensors.items():
        np.testing.assert_array_equal(store.bank(name)[lease.ids[0]], value)
    assert any(k.endswith(".out_scale") for k in tensors), "DoRA carries its magnitude ratio"


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("rank", "--max-rank 8"),
        ("module", "--target-modules"),
        ("base", "another base model"),
        ("nan", "NaN or Inf"),
        ("method", "--methods"),
    ],
)
def test_refused_adapters_leave_the_bundle_unchanged(small, case, match):
    base, tmp, bundle = small
    qv = {"target_modules": ["q_proj", "v_proj"]}
    if case == "rank":
        source = make_adapter(base, "lora", tmp, name="big", r=8, **qv)
    elif case == "module":
        source = make_adapter(base, "lora", tmp, name="wide", target_modules=["q_proj", "o_proj"])
    elif case == "base":
        other = tiny_model("llama", hidden_size=32, intermediate_size=64)
        source = make_adapter(other, "lora", tmp, name="other", **qv)
    elif case == "nan":
        source = make_adapter(base, "lora", tmp, name="nan", **qv)
        weights = source / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        first = sorted(tensors)[0]
        tensors[first] = tensors[first].copy()
        tensors[first].flat[0] = np.nan
        save_file(tensors, str(weights))
    else:  # IA3 scaling v_proj's input needs in_scale, which a lora,dora graph lacks
        source = make_adapter(base, "ia3", tmp, name="ia3", **qv, feedforward_modules=["v_proj"])
    before = _snapshot(bundle)
    with pytest.raises(ExportError, match=match):
        add_adapter(bundle, f"new-{case}", source)
    assert _snapshot(bundle) == before


def test_adapters_are_gated_on_the_inputs_they_fill_not_on_method_names(small, tmp_path):
    """Issue 21 item 4: an IA3 adapter that scales only module outputs fills `out_scale`,
    which a lora,dora graph has; and a runtime reading a manifest that names only `lora`
    (as bundles exported before the fix do) serves an rsLoRA file, which fills A and B."""
    base = small[0]
    bundle = _copied(small, tmp_path)
    qv = {"target_modules": ["q_proj", "v_proj"]}
    ia3 = make_adapter(base, "ia3", tmp_path, name="out-ia3", **qv, feedforward_modules=[])
    assert add_adapter(bundle, "out-ia3", ia3).method == "ia3"
    rs = make_adapter(base, "rslora", tmp_path, name="rs", seed=5, **qv)
    assert add_adapter(bundle, "rs", rs).method == "rslora"
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["adapters"]["methods"] = ["lora", "dora"]
    manifest_path.write_text(json.dumps(manifest))
    store = AdapterStore(bundle, load_manifest(bundle))
    lease = store.acquire(["rs", "out-ia3"])
    for name, slot in zip(("rs", "out-ia3"), lease.ids, strict=True):
        want = _file_values(store, bundle / "adapters" / f"{name}.safetensors")
        _assert_same(_slot_values(store, int(slot)), want)


def test_cli_error_is_one_line_exit_2(small, capsys):
    _, tmp, bundle = small
    with pytest.raises(SystemExit) as exit_info:
        main(["adapters", "add", str(bundle), f"x={tmp / 'missing'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_store_refuses_tampered_files(small, tmp_path):
    _, _, bundle = small
    manifest = load_manifest(bundle)
    path = bundle / manifest.adapters.installed["a3"].file
    original = path.read_bytes()
    try:
        tensors = load_file(str(path))
        meta = dict(
            json.loads(original[8 : 8 + int.from_bytes(original[:8], "little")])["__metadata__"]
        )
        save_file(tensors, str(path), metadata={**meta, "base_weights_sha256": "0" * 64})
        with pytest.raises(InferenceError, match="another base model"):
            AdapterStore(bundle, manifest).acquire(["a3"])
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].copy()
        tensors[key].flat[0] = np.inf
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(InferenceError, match="NaN or Inf"):
            AdapterStore(bundle, manifest).acquire(["a3"])
        with pytest.raises(InferenceError, match="unknown"):
            AdapterStore(bundle, manifest).acquire(["nope"])
    finally:
        path.write_bytes(original)


def test_add_list_remove_and_store_sees_new_adapters(small, capsys):
    base, tmp, bundle = small
    store = AdapterStore(bundle, load_manifest(bundle))
    source = make_adapter(base, "lora", tmp, name="late", seed=7, target_modules=["q_proj"])
    main_ok(["adapters", "add", str(bundle), f"late={source}"])
    assert "added late (lora, rank 4)" in capsys.readouterr().out
    assert store.owns("late")
    lease = store.acquire(["late"])
    store.release(lease)
    main_ok(["adapters", "list", str(bundle)])
    assert "late\tlora" in capsys.readouterr().out
    remove_adapter(bundle, "late")
    assert "late" not in load_manifest(bundle).adapters.installed
    assert not (bundle / "adapters" / "late.safetensors").exists()


def test_convert_bin_reads_only_tensors(tmp_path):
    folder = tmp_path / "binonly"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "adapter_model.bin")
    main_ok(["adapters", "convert-bin", str(folder)])
    assert load_file(str(folder / "adapter_model.safetensors"))["w"].tolist() == [1.0, 1.0]
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"w": torch.ones(1), "x": _Evil()}, evil / "adapter_model.bin")
    with pytest.raises(SystemExit):
        main(["adapters", "convert-bin", str(evil)])
    assert not (evil / "adapter_model.safetensors").exists()


class _Evil:
    pass


def main_ok(argv: list[str]) -> None:
    try:
        main(argv)
    except SystemExit as exc:
        assert not exc.code, f"exit {exc.code}"


def test_replaced_adapter_is_read_again_while_a_running_request_keeps_the_old(small, tmp_path):
    """`adapters add --replace` on a bundle a store serves: the next request gets the new
    weights; a request holding the old slot keeps reading the old ones."""
    base, tmp, original = small
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    store = AdapterStore(bundle, load_manifest(bundle))
    bank = next(k for k in store.specs if k.endswith(".B"))
    running = store.acquire(["a1"])
    (old_slot,) = running.slots
    old_values = store.bank(bank)[old_slot].copy()
    source = make_adapter(base, "lora", tmp, name="a1-new", seed=11, target_modules=["q_proj"])
    main_ok(["adapters", "add", str(bundle), f"a1={source}", "--replace"])
    fresh = load_file(str(bundle / "adapters" / "a1.safetensors"))
    lease = store.acquire(["a1"])
    (new_slot,) = lease.slots
    assert new_slot != old_slot
    np.testing.assert_array_equal(store.bank(bank)[old_slot], old_values)
    want = fresh.get(bank, np.zeros_like(old_values))
    np.testing.assert_array_equal(store.bank(bank)[new_slot], want)
    assert not np.array_equal(want, old_values)
    store.release(lease)
    store.release(running)
    again = store.acquire(["a1"])
    assert again.slots == (new_slot,)
    store.release(again)


def test_bank_allocation_failure_is_one_line_error(small, monkeypatch):
    _, _, bundle = small

    def refuse(dtype, counts):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(host_memory, "carve", refuse)
    with pytest.raises(InferenceError, match=r"cannot allocate \d+ MiB .* smaller --slots"):
        AdapterStore(bundle, load_manifest(bundle))


def _copied(small, tmp_path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(small[2], bundle)
    return bundle


def _slot_values(store: AdapterStore, slot: int) -> dict[str, np.ndarray]:
    return {name: store.bank(name)[slot].copy() for name in store.specs}


def _file_values(store: AdapterStore, path: Path) -> dict[str, np.ndarray]:
    """What a slot holding this file must contain (banks it has no tensor for: slot 0)."""
    tensors = load_file(str(path))
    return {name: tensors.get(name, store.bank(name)[0]) for name in store.specs}


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_replace_between_two_requests_loads_never_serves_old_weights_later(
    small, tmp_path, monkeypatch
):
    """Issue 21 item 1. Request A reads the old a1, the file is replaced, request B reads the
    new one; A then places its copy before B looks for a slot. B and every later request must
    get the new weights (the store once placed A's copy under the bare name and served it)."""
    base, tmp, _ = small
    bundle = _copied(small, tmp_path)
    store = AdapterStore(bundle, load_manifest(bundle))
    path = bundle / "adapters" / "a1.safetensors"
    old = _file_values(store, path)
    gates = {
        "A": (threading.Event(), threading.Event()),
        "B": (threading.Event(), threading.Event()),
    }
    real_load = store._load  # what acquire calls: (host copy, whether it was held already)

    def paused_load(name: str):
        loaded = real_load(name)
        gate = gates.get(threading.current_thread().name)
        if gate is not None:
            gate[0].set()  # read its copy of the file...
            assert gate[1].wait(60), "test gate never opened"  # ...and waits to place it
        return loaded

    monkeypatch.setattr(store, "_load", paused_load)
    leases = {}

    def request(label: str) -> None:
        leases[label] = store.acquire(["a1"])

    threads = {
        label: threading.Thread(target=request, args=(label,), name=label) for label in gates
    }
    threads["A"].start()
    assert gates["A"][0].wait(60)
    source = make_adapter(base, "lora", tmp, name="a1-v2", seed=21, **_QV)
    main_ok(["adapters", "add", str(bundle), f"a1={source}", "--replace"])
    new = _file_values(store, path)
    assert any(not np.array_equal(old[k], new[k]) for k in old)
    threads["B"].start()
    assert gates["B"][0].wait(60)
    gates["A"][1].set()
    threads["A"].join(60)
    gates["B"][1].set()
    threads["B"].join(60)
    assert set(leases) == {"A", "B"}, "a request failed (see the thread's exception above)"
    (slot_a,), (slot_b,) = leases["A"].slots, leases["B"].slots
    _assert_same(_slot_values(store, slot_a), old)  # A keeps the copy it started with
    _assert_same(_slot_values(store, slot_b), new)
    later = store.acquire(["a1"])
    assert later.slots == (slot_b,)
    store.release(later)
    store.release(leases["B"])
    store.release(leases["A"])
    assert store.resident() == {"a1": slot_b}, "the old copy's slot is freed once unpinned"
    again = store.acquire(["a1"])
    _assert_same(_slot_values(store, again.slots[0]), new)
    store.release(again)


_QV = {"target_modules": ["q_proj", "v_proj"]}


def test_header_and_tensor_bytes_come_from_one_open_file(small, tmp_path, monkeypatch):
    """Issue 21 item 2. The file is replaced (renamed over) between the header read and the
    tensor read: the store must read the bytes of the file whose header it checked."""
    bundle = _copied(small, tmp_path)
    store = AdapterStore(bundle, load_manifest(bundle))
    path = bundle / "adapters" / "a1.safetensors"
    want = _file_values(store, path)
    other = bundle / "adapters" / ".a2-copy"
    shutil.copyfile(bundle / "adapters" / "a2.safetensors", other)
    real_check = adapter_store.check_adapter_header

    def check_then_replace(*args) -> None:
        real_check(*args)
        if other.exists():
            os.replace(other, path)

    monkeypatch.setattr(adapter_store, "check_adapter_header", check_then_replace)
    lease = store.acquire(["a1"])
    _assert_same(_slot_values(store, lease.slots[0]), want)
    store.release(lease)
    assert not other.exists(), "the replacement happened"


def test_file_changed_under_the_bundle_is_refused_before_a_slot_is_written(small, tmp_path):
    """Issue 21 item 2: a valid adapter file that is not the one the manifest recorded."""
    bundle = _copied(small, tmp_path)
    shutil.copyfile(bundle / "adapters" / "a2.safetensors", bundle / "adapters" / "a1.safetensors")
    store = AdapterStore(bundle, load_manifest(bundle))
    before = {name: store.bank(name).copy() for name in store.specs}
    with pytest.raises(InferenceError) as info:
        store.acquire(["a1"])
    message = str(info.value)
    assert "a1.safetensors: the file changed under the bundle" in message
    assert "re-add the adapter" in message and "\n" not in message
    _assert_same({name: store.bank(name) for name in store.specs}, before)
    assert store.resident() == {} and store.held() == []


def test_release_twice_unpins_once(small):
    """Issue 21 item 7: a second release of a lease used to drive the pin count to -1, which
    counts as pinned forever (and lets a later request's slot be evicted under it)."""
    bundle = small[2]
    store = AdapterStore(bundle, load_manifest(bundle), wait_timeout_s=0.5)
    lease = store.acquire(["a0"])
    store.release(lease)
    store.release(lease)
    held = store.acquire(["a0"])
    assert store.drop("a0") is False, "a0 is in use by `held`"
    store.release(held)
    both = store.acquire(["a1", "a2"])  # needs both slots unpinned
    store.release(both)
    assert store.drop("a1") and store.drop("a2")


def test_write_slot_is_locked_and_keeps_the_slot_map_true(small, monkeypatch):
    """Issue 21 item 7: `write_slot` is public; it must take the store's lock, refuse a slot
    a request pins, and record what it wrote (the slot's old adapter is no longer there)."""
    bundle = small[2]
    store = AdapterStore(bundle, load_manifest(bundle))
    real_write = store._write_slot_locked

    def write_checking_the_lock(slot, adapter) -> None:
        assert store._lock._is_owned(), "a slot is written without the store's lock"
        real_write(slot, adapter)

    monkeypatch.setattr(store, "_write_slot_locked", write_checking_the_lock)
    a0 = _file_values(store, bundle / "adapters" / "a0.safetensors")
    a1 = _file_values(store, bundle / "adapters" / "a1.safetensors")
    lease = store.acquire(["a0"])
    (slot,) = lease.slots
    with pytest.raises(InferenceError, match="in use"):
        store.write_slot(slot, store.load("a1"))
    _assert_same(_slot_values(store, slot), a0)
    store.release(lease)
    store.write_slot(slot, store.load("a1"))
    _assert_same(_slot_values(store, slot), a1)
    assert store.resident() == {"a1": slot}
    again = store.acquire(["a0"])
    _assert_same(_slot_values(store, again.slots[0]), a0)
    store.release(again)
