"""Staged writes: the target is either the old or the new content, never a mix."""

from __future__ import annotations

import pytest

from peft_export.bundle import BundleError
from peft_export.bundle.atomic import staged_dir, staged_file, write_text


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
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


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
