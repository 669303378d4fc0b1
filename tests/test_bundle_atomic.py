"""Staged writes: the target is either the old or the new content, never a mix."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import pytest

from peft_export.bundle import BundleError, atomic
from peft_export.bundle.atomic import staged_dir, staged_file, staged_update, write_text
from peft_export.bundle.manifest import load_manifest


def test_new_dir_appears_only_on_success(tmp_path):
    target = tmp_path / "bundle"
    with pytest.raises(RuntimeError), staged_dir(target) as stage:
        (stage / "manifest.json").write_text("{}")
        raise RuntimeError("export failed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with staged_dir(target) as stage:
        (stage / "manifest.json").write_text("new")
    assert (target / "manifest.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_existing_dir_needs_force_and_is_swapped(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(BundleError, match="--force"), staged_dir(target):
        pass
    with pytest.raises(RuntimeError), staged_dir(target, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
        raise RuntimeError
    assert (target / "old.txt").read_text() == "old"
    with staged_dir(target, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]


def test_stale_staging_is_cleaned(tmp_path):
    stale = tmp_path / ".bundle.staging-abc"
    stale.mkdir()
    with staged_dir(tmp_path / "bundle") as stage:
        (stage / "x").write_text("x")
    assert not stale.exists()


def test_staged_file(tmp_path):
    target = tmp_path / "m.json"
    write_text(target, "one")
    with pytest.raises(KeyError), staged_file(target) as tmp:
        tmp.write_text("two")
        raise KeyError
    assert target.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_written_bundles_are_readable_by_others(tmp_path):
    target = tmp_path / "bundle"
    with staged_dir(target) as stage:
        (stage / "x").write_text("x")
    write_text(target / "manifest.json", "{}")
    assert target.stat().st_mode & 0o055 == 0o055
    assert (target / "manifest.json").stat().st_mode & 0o044 == 0o044


# -- the two-rename swap where RENAME_EXCHANGE is unavailable (NFS) ---------------------------


def _bundle(target: Path, text: str) -> Path:
    target.mkdir()
    (target / "manifest.json").write_text(text)
    (target / "model.onnx").write_text(text)
    return target


def _contents(target: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(target.iterdir())}


class _Renames:
    """os.rename that fails on the calls numbered in `failing` (1-based), counting every call."""

    def __init__(self, failing: set[int]) -> None:
        self.failing, self.calls, self.real = failing, 0, os.rename

    def __call__(self, src, dst) -> None:
        self.calls += 1
        if self.calls in self.failing:
            raise OSError(errno.EIO, f"injected failure of rename {self.calls}")
        self.real(src, dst)


@pytest.fixture
def no_exchange(monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def fail(*failing: int) -> _Renames:
        renames = _Renames(set(failing))
        monkeypatch.setattr(atomic.os, "rename", renames)
        return renames

    return fail


def test_fallback_swap_replaces_the_bundle(tmp_path, no_exchange):
    target = _bundle(tmp_path / "bundle", "old")
    renames = no_exchange()
    with staged_dir(target, overwrite=True) as stage:
        (stage / "manifest.json").write_text("new")
    assert renames.calls == 2
    assert _contents(target) == {"manifest.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.lock", "bundle"]


@pytest.mark.parametrize(
    ("failing", "swapped_back"),
    [
        ((1,), True),  # the bundle cannot move aside: nothing changed
        ((2,), True),  # the new one cannot move in: the bundle moves back at once
        ((2, 3), False),  # ...and moving it back fails too: it stays aside, the next writer
    ],
)
@pytest.mark.parametrize("writer", ["export --force", "adapters add"])
def test_fallback_swap_never_loses_the_bundle(tmp_path, no_exchange, failing, swapped_back, writer):
    target = _bundle(tmp_path / "bundle", "old")
    no_exchange(*failing)
    write = staged_dir(target, overwrite=True) if writer == "export --force" else None
    with pytest.raises(OSError, match="injected"), write or staged_update(target) as stage:
        (stage / "manifest.json").unlink(missing_ok=True)
        (stage / "manifest.json").write_text("new")
    assert target.is_dir() == swapped_back
    if swapped_back:
        assert _contents(target) == {"manifest.json": "old", "model.onnx": "old"}
    else:
        assert _contents(atomic.previous_path(target)) == {
            "manifest.json": "old",
            "model.onnx": "old",
        }
        with pytest.raises(BundleError, match=r"\.bundle\.previous is there.*move"):
            load_manifest(target)
    no_exchange()  # renames work again: the next write of either kind keeps the old bundle
    with staged_update(target) as stage:
        (stage / "added.txt").write_text("added")
    assert _contents(target) == {"added.txt": "added", "manifest.json": "old", "model.onnx": "old"}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("bundle", ".bundle.lock")]
    assert leftovers == []


def test_a_killed_swap_is_finished_by_the_next_export(tmp_path, no_exchange):
    """Killed after moving the bundle aside: an export --force (or plain export) puts it back
    before anything else, so a refused export leaves it in place."""
    target = _bundle(tmp_path / "bundle", "old")
    (tmp_path / ".bundle.lock").touch()
    os.rename(target, atomic.previous_path(target))
    with pytest.raises(BundleError, match="already exists"), staged_dir(target):
        pass
    assert _contents(target) == {"manifest.json": "old", "model.onnx": "old"}


def test_a_leftover_previous_is_removed_once_the_bundle_exists(tmp_path, no_exchange):
    target = _bundle(tmp_path / "bundle", "new")
    _bundle(atomic.previous_path(target), "old")
    with staged_update(target) as stage:
        (stage / "x").write_text("x")
    assert not atomic.previous_path(target).exists()
    assert _contents(target)["manifest.json"] == "new"


# -- export --force and adapters add take turns ----------------------------------------------


def test_replacing_a_bundle_waits_for_the_writer_lock(tmp_path):
    target = _bundle(tmp_path / "bundle", "old")
    entered = threading.Event()

    def export_force() -> None:
        with staged_dir(target, overwrite=True) as stage:
            entered.set()
            (stage / "manifest.json").write_text("new")

    with open(tmp_path / ".bundle.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as `adapters add` holds it
        thread = threading.Thread(target=export_force)
        thread.start()
        assert not entered.wait(1.0), "export --force wrote while another writer held the lock"
        fcntl.flock(lock, fcntl.LOCK_UN)
    thread.join(30)
    assert entered.is_set() and _contents(target) == {"manifest.json": "new"}


def test_export_force_and_adapters_add_do_not_lose_each_other(tmp_path):
    """An `adapters add` started while `export --force` writes waits, then applies to the new
    bundle (without the lock, the export's swap would drop the added file, or the add's swap
    would put the old bundle back)."""
    from tiny import tiny_model

    from peft_export.exporter.pipeline import export_model

    target = tmp_path / "bundle"
    export_model(tiny_model("gpt2"), target)
    old = (target / "model.onnx").read_bytes()
    added = threading.Event()

    def adapters_add() -> None:
        with staged_update(target) as stage:
            (stage / "added.txt").write_text("added")
        added.set()

    adder = threading.Thread(target=adapters_add)

    def concurrent_add(stage: Path, manifest) -> None:
        adder.start()
        assert not added.wait(1.0), "adapters add swapped the bundle while export --force wrote"

    export_model(tiny_model("gpt2", seed=1), target, force=True, post_steps=[concurrent_add])
    adder.join(60)
    assert added.is_set() and (target / "added.txt").read_text() == "added"
    assert (target / "model.onnx").read_bytes() != old
