"""Parse untrusted JSON (manifests, safetensors headers, adapter configs) with bounded cost.

`json.loads` recurses once per nesting level, so a file nested 50,000 levels deep raises
RecursionError (a traceback, not the project's error), and it allocates ~80 bytes per empty
`[]` or `{}`, so 100 MB of `[[],[],...]` grows to gigabytes. Both are bounded here, on the
raw bytes, before `json.loads` sees them, with C-speed passes (`bytes.count`, `replace`,
`translate`, numpy) instead of a Python loop over every byte.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from peft_export.bundle.errors import BundleError

MAX_DEPTH = 64
"""Real files nest under 10 levels (a manifest's base-model config is the deepest)."""
MAX_TOKENS = 4_000_000
"""Bound on the bytes `[ ] { } , : " \\` in a file: a 1,000-tensor safetensors header has about
25,000. It bounds the values `json.loads` creates, so its memory stays near the file's size
plus ~200 MB (measured: 4 million floats, ints or empty lists)."""

_TOKENS = b'[]{},:"\\'
_DROP = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_QUOTE = ord('"')
_OPENERS = np.frombuffer(b"[{", np.uint8)
_CLOSERS = np.frombuffer(b"]}", np.uint8)


def load_json(raw: bytes, *, where: str, fix: str) -> Any:
    """`json.loads(raw)` once its number of values and its nesting are known to be bounded.

    `where` names the file (and part) in the error, `fix` says what to do; every refusal
    is a BundleError of one line.
    """
    tokens = sum(raw.count(bytes([byte])) for byte in _TOKENS)
    if tokens > MAX_TOKENS:
        raise BundleError(
            f"{where}: {tokens} JSON values and separators, more than the {MAX_TOKENS} "
            f"a real file has; {fix}"
        )
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise BundleError(f"{where}: JSON nested {depth} levels deep (at most {MAX_DEPTH}); {fix}")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BundleError(f"{where}: not valid JSON (not UTF-8 text); {fix}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{where}: not valid JSON ({exc}); {fix}") from None


def nesting_depth(raw: bytes) -> int:
    """The deepest `[`/`{` nesting outside string literals (brackets in strings do not count).

    Escapes go first (an escaped backslash, then an escaped quote, as JSON reads them left to
    right), so every quote left opens or closes a string. Input that is not valid JSON gives
    some number; `json.loads` then refuses it.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    codes = np.frombuffer(unescaped.translate(None, _DROP), np.uint8)
    quotes = codes == _QUOTE
    outside = (np.cumsum(quotes, dtype=np.int32) % 2 == 0) & ~quotes
    opens = np.isin(codes, _OPENERS) & outside
    closes = np.isin(codes, _CLOSERS) & outside
    steps = opens.astype(np.int32) - closes.astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))
