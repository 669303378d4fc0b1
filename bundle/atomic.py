"""Atomic bundle writes: stage next to the target, then rename.

A killed process leaves either the previous bundle or the new one, never a mix. Staging
folders and files are dot-prefixed siblings (`.NAME.staging-*`) that readers ignore and the
next write removes.

A new folder replaces an existing bundle with one `renameat2(RENAME_EXCHANGE)`. Where that is
not available (NFS, other kernels) it takes two renames: the bundle moves aside to
`.NAME.previous`, then the new one moves in. A failed second rename moves the bundle back; a
process killed between the two leaves it at `.NAME.previous`, and the next writer (all of them
take the lock `.NAME.lock` while one exists) moves it back before anything else, so the last
good bundle is never deleted: a `.NAME.previous` is removed only once NAME exists again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from peft_export.bundle.errors import BundleError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def previous_path(target: Path) -> Path:
    """Where the two-rename swap keeps the bundle it replaces (see the module docstring)."""
    return target.with_name(f".{target.name}.previous")


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _recover(target: Path) -> None:
    """Finish what a killed writer left: a moved-aside bundle goes back, stages go away.

    Called with the writer lock held, so no live writer owns these paths.
    """
    previous = previous_path(target)
    if previous.exists():
        if target.exists():  # the swap that moved it aside completed
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(previous, target)
    for stale in target.parent.glob(f".{target.name}.staging-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes `target` in one step.

    Replacing a bundle (`export --force`) takes the writer lock of `staged_update`, for the
    whole write: a concurrent `adapters add` is neither lost in the swap nor swapped over it.
    """
    target = Path(target).absolute()
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    locked = target.exists() or _lock_path(target).exists()
    with _writer_lock(target) if locked else contextlib.nullcontext():
        _recover(target)
        _check_target(target, overwrite)
        with _stage_and_swap(target) as stage:
            yield stage


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise BundleError(f"{target} already exists; choose another --out or pass --force")
    if target.exists() and not target.is_dir():
        raise BundleError(f"{target} exists and is not a folder; choose another --out")


@contextlib.contextmanager
def _stage_and_swap(target: Path) -> Iterator[Path]:
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the bundle from other users
    try:
        yield stage
        _fsync_dir(stage)
        if not target.exists():
            os.rename(stage, target)
        elif _exchange(stage, target):
            shutil.rmtree(stage, ignore_errors=True)  # now the old bundle
        else:
            _swap_by_two_renames(stage, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _swap_by_two_renames(stage: Path, target: Path) -> None:
    """Replace `target` by `stage` without RENAME_EXCHANGE; the old bundle is never deleted
    before the new one is in place (see the module docstring)."""
    previous = previous_path(target)
    os.rename(target, previous)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(previous, target)  # if this fails too, the next writer moves it back
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


@contextlib.contextmanager
def staged_update(target: str | Path) -> Iterator[Path]:
    """Change an existing bundle as one step: yield a hard-linked copy of it to modify.

    Replace files in the copy (staged_file, write_text, unlink), never write into one in
    place: its inode is shared with the live bundle. On success the copy takes the bundle's
    place in one rename, so a killed `adapters add` or engine build leaves the old bundle,
    whole. Writers of one bundle take turns (a lock on the sibling `.NAME.lock`), so they
    read the manifest inside the block and never lose each other's changes.
    """
    target = Path(target).absolute()
    missing = f"{target}: not a bundle directory; pass the folder written by 'export'"
    if not target.is_dir() and not previous_path(target).is_dir():
        raise BundleError(missing)
    with _writer_lock(target):
        _recover(target)
        if not target.is_dir():
            raise BundleError(missing)
        with _stage_and_swap(target) as stage:
            _link_tree(target, stage)
            yield stage


@contextlib.contextmanager
def _writer_lock(target: Path) -> Iterator[None]:
    with open(_lock_path(target), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _link_tree(source: Path, dest: Path) -> None:
    """Recreate `source` under `dest` with hard links (copies across file systems)."""
    for folder, dirs, files in os.walk(source):
        here = Path(folder)
        there = dest / here.relative_to(source)
        for entry in (*dirs, *files):
            path, copy = here / entry, there / entry
            if path.is_symlink():
                os.symlink(os.readlink(path), copy)
            elif path.is_dir():
                copy.mkdir()
            else:
                try:
                    os.link(path, copy)
                except OSError:
                    shutil.copy2(path, copy)


@contextlib.contextmanager
def staged_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.staging-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str) -> None:
    with staged_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
