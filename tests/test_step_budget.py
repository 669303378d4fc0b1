"""The scheduler's prefill budget: the whole cap while nothing decodes, else a measured share of
a decode call's time (runtime/scheduler/step_budget.py)."""

from __future__ import annotations

import pytest

from peft_export.runtime.scheduler.step_budget import StepBudget


def test_cap_while_nothing_decodes_and_floor_before_any_measurement():
    budget = StepBudget(cap=512, share=0.75, floor=32)
    assert budget.tokens(decoding=False) == 512
    assert budget.tokens(decoding=True) == 32  # no call measured yet
    budget.observe_decode(0.5)
    assert budget.tokens(decoding=True) == 32  # still no prefill measured


def test_fit_recovers_fixed_and_per_token_cost_and_sizes_the_chunk():
    budget = StepBudget(cap=512, share=0.75, floor=8)
    for n in (16, 64, 32, 128, 16, 96):
        budget.observe_prefill(n, 0.2 + 0.005 * n, decoding=True)
    fixed, per_token = budget.model()
    assert fixed == pytest.approx(0.2)
    assert per_token == pytest.approx(0.005)
    budget.observe_decode(0.6)
    # 0.75 * 0.6 = 0.45 s for the call: 0.2 fixed + 0.005 * 50
    assert budget.tokens(decoding=True) == 50
    budget.observe_prefill(100, 0.7, decoding=True)
    for _ in range(10):  # a slower decode batch (an average over calls) allows more, up to the cap
        budget.observe_decode(10.0)
    assert budget.tokens(decoding=True) == 200  # at most twice the last chunk beside decoding
    budget.observe_prefill(400, 2.2, decoding=True)
    assert budget.tokens(decoding=True) == 512


def test_one_call_size_or_a_senseless_fit_has_no_fixed_part_and_floor_holds():
    budget = StepBudget(cap=256, share=1.0, floor=16)
    budget.observe_prefill(32, 0.32, decoding=False)
    assert budget.model() == (0.0, pytest.approx(0.01))
    budget.observe_decode(0.05)  # faster than the fixed cost: the floor, never zero
    assert budget.tokens(decoding=True) == 16


def test_a_fit_from_one_large_idle_call_grows_chunks_from_the_floor():
    budget = StepBudget(cap=512, share=0.75, floor=32)
    budget.observe_prefill(320, 1.0, decoding=False)  # all of it looks per-token
    budget.observe_decode(0.8)
    assert budget.tokens(decoding=True) == 32
    budget.observe_prefill(32, 0.3, decoding=True)
    assert budget.tokens(decoding=True) <= 64
