"""The benchmarks' output check (scripts/bench_checks.py): a side that computes something
else fails the run instead of just looking faster.

Unit tests of the check and of `rounds`, and a smoke test of scripts/bench_adapters.py's
own sides on a tiny model, with a side that skips its adapter or mixes up its rows.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import make_adapters, save_tiny_tokenizer, tiny_model

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
bench_checks = importlib.import_module("bench_checks")
Compare, OutputCheck, Sample = bench_checks.Compare, bench_checks.OutputCheck, bench_checks.Sample


def test_equal_ids_pass_and_exit_zero():
    check = OutputCheck("ids")
    assert check.ids("a vs b", [[1, 2, 3], [4]], [[1, 2, 3], [4]])
    assert check.passed and check.exit_status() == 0


def test_a_differing_token_fails_and_says_where():
    check = OutputCheck("ids")
    assert not check.ids("a vs b", [[1, 2, 3], [4, 5, 9]], [[1, 2, 3], [4, 5, 6]], repeat=2)
    assert not check.passed and check.exit_status() == 1
    (mismatch,) = check.mismatches
    assert (mismatch["row"], mismatch["step"], mismatch["repeat"]) == (1, 2, 2)
    assert (mismatch["got"], mismatch["expected"]) == ([9], [6])


def test_a_shorter_row_or_fewer_rows_fail():
    check = OutputCheck("ids")
    assert not check.ids("prefix", [[1, 2]], [[1, 2, 3]])
    assert check.mismatches[-1]["step"] == 2
    assert not check.ids("rows", [[1]], [[1], [1]])
    assert check.exit_status() == 1


def test_a_run_that_compared_nothing_fails():
    check = OutputCheck("ids")
    assert not check.passed and check.exit_status() == 1


def test_values_within_the_stated_tolerance():
    want = np.array([1.0, -2.0, 4.0])
    check = OutputCheck("values")
    assert check.close("near", want * (1 + 1e-4), want, rtol=2e-4, atol_of_max=0.0)
    assert check.passed
    assert not check.close("far", want * 1.01, want, rtol=2e-4, atol_of_max=1e-3)
    assert not check.close("zeros", np.zeros(3), want, rtol=1e-2, atol_of_max=1e-2)
    assert not check.close("nan", np.array([1.0, np.nan, 4.0]), want, rtol=1, atol_of_max=1)
    assert [m["check"] for m in check.mismatches] == ["far", "zeros", "nan"]
    assert check.exit_status() == 1


def test_an_adapter_that_changes_nothing_fails():
    check = OutputCheck("ids")
    assert check.differs("matters", [[1, 2]], [[1, 3]])
    assert not check.differs("does not", [[1, 2]], [[1, 2]])
    assert check.exit_status() == 1


def test_finish_prints_the_check_in_the_json(capsys):
    check = OutputCheck("ids")
    check.ids("a vs b", [[1]], [[2]])
    assert bench_checks.finish({"speed": 3.0}, check) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["speed"] == 3.0
    assert report["output_check"]["passed"] is False
    assert report["output_check"]["mismatch_count"] == 1
    assert "output check FAILED" in err


def _side(log: list[str], name: str, ids: list[list[int]], value: float = 1.0):
    def run() -> Sample:
        log.append(name)
        return Sample(value, ids)

    return run


def test_rounds_alternate_warm_up_and_check_every_repeat():
    log: list[str] = []
    sides = {"a": [_side(log, "a", [[1, 2]])], "b": [_side(log, "b", [[1, 2]])]}
    check = OutputCheck("ids")
    values = bench_checks.rounds(sides, 3, check, [Compare("a", "b")])
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then alternating
    assert values == {"a": [[1.0]] * 3, "b": [[1.0]] * 3}
    assert check.passed and check.comparisons == 3


def test_rounds_catch_a_side_that_differs_on_one_repeat_only():
    calls = iter([[[1, 2]], [[1, 2]], [[1, 7]]])
    sides = {"a": [lambda: Sample(1.0, next(calls))], "b": [lambda: Sample(1.0, [[1, 2]])]}
    check = OutputCheck("ids")
    bench_checks.rounds(sides, 3, check, [Compare("a", "b")], warmup=False)
    assert [m["repeat"] for m in check.mismatches] == [2]
    assert check.exit_status() == 1


def test_rounds_compare_sessions_and_the_first_rows_only():
    log: list[str] = []
    sides = {
        "batch": [_side(log, "s0", [[1], [2]]), _side(log, "s1", [[1], [3]])],
        "merged": [_side(log, "m", [[1], [1]])],
    }
    check = OutputCheck("ids")
    bench_checks.rounds(sides, 1, check, [Compare("merged", "batch", rows=1)], warmup=False)
    assert [m["check"] for m in check.mismatches] == ["batch session 1 vs session 0"]


# Smoke test: scripts/bench_adapters.py's sides on a tiny Llama.

TOKENS = 6


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    from peft_export.exporter.pipeline import InMemoryBase, export_bundle
    from peft_export.exporter.runtime_adapters.planner import plan_lora_banks
    from peft_export.runtime.session import load_bundle

    tmp = tmp_path_factory.mktemp("bench-adapters")
    model = tiny_model("llama")
    base = InMemoryBase(model, tokenizer_dir=save_tiny_tokenizer(tmp / "tokenizer"))
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    dirs = make_adapters(model, {"a0": ("lora", lora), "a1": ("lora", lora)}, tmp, first_seed=3)
    export_bundle(
        base,
        list(dirs.items()),
        out=tmp / "runtime",
        mode="runtime",
        planners=[plan_lora_banks],
        options={"max_rank": 4, "slots": 3},
    )
    export_bundle(base, [("a0", dirs["a0"])], out=tmp / "merged")
    runtime = load_bundle(tmp / "runtime", threads=1)
    merged = load_bundle(tmp / "merged", threads=1)
    return runtime, merged


class SkipsAdapter:
    """A runtime bundle whose generate ignores the adapters: faster, and wrong."""

    def __init__(self, bundle) -> None:
        self.bundle = bundle

    def generate(self, prompts, *, adapters, **kw):
        return self.bundle.generate(prompts, adapters=None, **kw)


class SwapsRows:
    """A runtime bundle that serves each row with the next row's adapter."""

    def __init__(self, bundle) -> None:
        self.bundle = bundle

    def generate(self, prompts, *, adapters, **kw):
        if isinstance(adapters, list):
            adapters = adapters[1:] + adapters[:1]
        return self.bundle.generate(prompts, adapters=adapters, **kw)


@pytest.fixture(scope="module")
def bench_adapters():
    return importlib.import_module("bench_adapters")


def test_bench_adapters_decode_sides_agree(tiny_bundles, bench_adapters):
    runtime, merged = tiny_bundles
    check = bench_adapters.new_check(runtime, TOKENS)
    sides, compares = bench_adapters.decode_sides([runtime], [merged], [], TOKENS)
    bench_checks.rounds(sides, 2, check, compares, case="b")
    assert check.passed, check.mismatches


def test_bench_adapters_fails_on_a_side_that_skips_its_adapter(
    tiny_bundles, bench_adapters, capsys
):
    runtime, merged = tiny_bundles
    check = bench_adapters.new_check(runtime, TOKENS)
    sides, compares = bench_adapters.decode_sides([SkipsAdapter(runtime)], [merged], [], TOKENS)
    bench_checks.rounds(sides, 2, check, compares, case="b")
    assert {m["check"] for m in check.mismatches} == {"b: runtime_lora[0] vs merged"}
    assert [m["repeat"] for m in check.mismatches] == [0, 1]
    assert bench_checks.finish({}, check) == 1
    assert json.loads(capsys.readouterr().out)["output_check"]["passed"] is False


@pytest.mark.parametrize("wrong", [False, True], ids=["honest", "rows-swapped"])
def test_bench_adapters_batch_sides(tiny_bundles, bench_adapters, wrong):
    runtime, merged = tiny_bundles
    batch = SwapsRows(runtime) if wrong else runtime
    check = bench_adapters.new_check(runtime, TOKENS)
    sides, compares = bench_adapters.batch_sides([batch], [merged], [], ["a0", "a1"], TOKENS)
    bench_checks.rounds(sides, 1, check, compares, case="c", warmup=False)
    if not wrong:
        assert check.passed, check.mismatches
        return
    failed = {m["check"] for m in check.mismatches}
    assert failed == {
        "c: 8_adapters_one_batch[0] vs 8_adapters_one_after_another",
        "c: 1_merged_adapter_batch[0] vs 8_adapters_one_batch",
    }
    assert check.exit_status() == 1
