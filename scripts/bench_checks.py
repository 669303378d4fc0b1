"""Output checks shared by the benchmark scripts: a side's time only counts if it computed
the same thing as the side it is compared with.

A fast path that skipped work (an adapter not applied, a kernel that wrote nothing) would
otherwise just look faster. Every benchmark therefore compares each side's outputs with a
reference side on every repeat (greedy token ids where both sides run the same precision,
values within a stated tolerance where they do not), prints the outcome in its JSON under
"output_check", and exits with status 1 when any comparison failed (`finish`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

REPORTED = 5
"""Mismatches listed in the JSON; the count covers all of them."""


@dataclass(frozen=True)
class Sample:
    """One timed run of a side: what was measured and the greedy ids it produced."""

    value: float
    ids: list[list[int]]


@dataclass(frozen=True)
class Compare:
    """Side `side`'s ids must equal side `reference`'s (its first session's) every repeat;
    `rows`: only the first rows (a side that serves one adapter where the other serves
    several)."""

    side: str
    reference: str
    rows: int | None = None


class OutputCheck:
    """Collects the comparisons of a benchmark run; `passed` needs at least one and no
    mismatch, so a run that compared nothing fails too."""

    def __init__(self, rule: str) -> None:
        self.rule = rule
        self.comparisons = 0
        self.mismatches: list[dict[str, Any]] = []

    def ids(
        self,
        label: str,
        got: Sequence[Sequence[int]],
        expected: Sequence[Sequence[int]],
        *,
        repeat: int | None = None,
    ) -> bool:
        """Every row's ids equal, token for token (same precision, greedy)."""
        self.comparisons += 1
        if len(got) != len(expected):
            return self._fail(label, repeat, rows=len(got), expected_rows=len(expected))
        for row, (a, b) in enumerate(zip(got, expected, strict=True)):
            a, b = list(a), list(b)
            if a != b:
                step = _first_difference(a, b)
                return self._fail(
                    label,
                    repeat,
                    row=row,
                    step=step,
                    got=a[step : step + 4],
                    expected=b[step : step + 4],
                    lengths=[len(a), len(b)],
                )
        return True

    def close(
        self,
        label: str,
        got: np.ndarray,
        expected: np.ndarray,
        *,
        rtol: float,
        atol_of_max: float,
        repeat: int | None = None,
    ) -> bool:
        """Every element within rtol * |expected| + atol_of_max * max |expected| (NaN fails)."""
        self.comparisons += 1
        got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
        if got.shape != expected.shape:
            return self._fail(label, repeat, shape=list(got.shape), expected=list(expected.shape))
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        err = np.abs(got - expected)
        over = ~(err <= rtol * np.abs(expected) + atol_of_max * scale)
        if over.any():
            worst = float(np.nanmax(err)) if not np.isnan(err).all() else float("nan")
            return self._fail(
                label, repeat, elements_over=int(over.sum()), max_abs_err=worst, max_abs_ref=scale
            )
        return True

    def differs(self, label: str, with_adapter: Sequence, without: Sequence) -> bool:
        """The adapter changes the reference's output: else a side that skipped it would
        still agree, and the other comparisons would prove nothing."""
        self.comparisons += 1
        if [list(r) for r in with_adapter] == [list(r) for r in without]:
            return self._fail(label, None, problem="same ids with and without the adapter")
        return True

    def _fail(self, label: str, repeat: int | None, **details: Any) -> bool:
        self.mismatches.append({"check": label, "repeat": repeat, **details})
        return False

    @property
    def passed(self) -> bool:
        return self.comparisons > 0 and not self.mismatches

    def summary(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "rule": self.rule,
            "comparisons": self.comparisons,
            "mismatch_count": len(self.mismatches),
            "mismatches": self.mismatches[:REPORTED],
        }

    def exit_status(self) -> int:
        return 0 if self.passed else 1


def _first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length where one is a prefix)."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def rounds(
    sides: Mapping[str, Sequence[Callable[[], Sample]]],
    repeats: int,
    check: OutputCheck,
    compares: Sequence[Compare],
    *,
    case: str = "",
    warmup: bool = True,
) -> dict[str, list[list[float]]]:
    """Run every side's runs (sessions) once per repeat, the sides in reverse order every
    other repeat so that drift of the machine's speed hits both alike; with `warmup`, each
    run once untimed first. After every repeat each run's ids are compared: a side's later
    sessions with its first, and each `compares` side with its reference.

    Returns values[side][repeat][session]."""
    if warmup:
        for runs in sides.values():
            for run in runs:
                run()
    values: dict[str, list[list[float]]] = {name: [] for name in sides}
    prefix = f"{case}: " if case else ""
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        ids: dict[str, list[list[list[int]]]] = {}
        for name in order:
            samples = [run() for run in sides[name]]
            values[name].append([s.value for s in samples])
            ids[name] = [s.ids for s in samples]
        for name, sessions in ids.items():
            for i, got in enumerate(sessions[1:], start=1):
                check.ids(
                    f"{prefix}{name} session {i} vs session 0", got, sessions[0], repeat=repeat
                )
        for c in compares:
            want = ids[c.reference][0][: c.rows]
            for i, got in enumerate(ids[c.side]):
                check.ids(
                    f"{prefix}{c.side}[{i}] vs {c.reference}", got[: c.rows], want, repeat=repeat
                )
    return values


def finish(report: dict[str, Any], check: OutputCheck) -> int:
    """Print the report with the check's outcome as JSON; the exit status for the script
    (1, with the first mismatch on stderr, when the check failed)."""
    report["output_check"] = check.summary()
    print(json.dumps(report, indent=2, default=str))
    if not check.passed:
        first = check.mismatches[0] if check.mismatches else "no comparison was made"
        print(f"output check FAILED ({len(check.mismatches)} mismatches): {first}", file=sys.stderr)
    return check.exit_status()
