"""Path confinement: nothing named by a bundle may resolve outside the bundle."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from peft_export.bundle.errors import BundleError


def confined(root: Path, relative: str, *, lexical_only: bool = False) -> Path:
    """Return root/relative, refusing absolute paths, `..`, and symlinks that leave root."""
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or "\\" in relative or ".." in pure.parts:
        raise BundleError(
            f"bundle path {relative!r} escapes the bundle; paths must be relative and inside it"
        )
    path = root / pure
    if lexical_only:
        return path
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise BundleError(
            f"bundle path {relative!r} resolves outside the bundle (symlink?); copy the file in"
        )
    return path
