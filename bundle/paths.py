"""Path confinement: nothing named by a bundle may resolve outside the bundle."""

from __future__ import annotations

import os
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


def check_links(root: Path) -> None:
    """Refuse any symlink inside the bundle that leads outside it.

    Files the manifest does not name (model.onnx.data, tokenizer_config.json, a linked
    adapters/ folder that a later write would go through) are covered too.
    """
    real_root = root.resolve()
    for folder, dirs, files in os.walk(root):
        for entry in (*dirs, *files):
            path = Path(folder) / entry
            if not path.is_symlink():
                continue
            real = path.resolve()
            if real != real_root and real_root not in real.parents:
                relative = path.relative_to(root).as_posix()
                raise BundleError(
                    f"bundle file {relative!r} is a symlink to {real}, outside the bundle; "
                    "copy the file into the bundle instead"
                )
