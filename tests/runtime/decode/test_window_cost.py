"""The auto window on synthetic timings: the formula, the window it picks for given costs and
acceptance, switching drafting off on text the draft cannot guess (losing under 5 %) and
probing again. No machine timing is measured here."""

from __future__ import annotations

import random

import pytest

from layerline.packager.window_spec import WindowSpec
from layerline.runtime.decode.window_cost import (
    AcceptCounts,
    PassCost,
    SpeculationCosts,
    StepMeasurement,
    choose_window,
    expected,
)
from layerline.runtime.decode.window_policy import AutoWindow, GateSettings, WindowPolicy, policy_for

# Costs of the order measured for Qwen2.5-Coder 1.5B over 2 stages with the 0.5B draft (seconds).
PASS = PassCost(fixed_s=0.27, per_position_s=0.044)
DRAFT_S = 0.10


def measured(draft_s: float = DRAFT_S, cost: PassCost = PASS, share: float = 0.45,
             prior: float | None = None) -> SpeculationCosts:
    costs = SpeculationCosts()
    costs.record_draft(10, 10 * draft_s)
    for n in (1, 5, 9):
        costs.record_pass(n, cost(n), share)
    if prior is not None:
        costs.record_accept_rate(prior)
    return costs


def counts_at(alpha: float, steps: int = 40, window: int = 8, seed: int = 0) -> AcceptCounts:
    """Evidence of `steps` steps of `window` drafts, each standing with chance `alpha`."""
    rng = random.Random(seed)
    counts = AcceptCounts(prior=0.5)
    for _ in range(steps):
        accepted = 0
        while accepted < window and rng.random() < alpha:
            accepted += 1
        counts.add(window, accepted)
    return counts


def test_the_formula_gives_the_expected_tokens_and_seconds_per_pass():
    alpha = 0.8
    tokens, seconds = expected(4, [alpha] * 4, 0.8, DRAFT_S, PASS, 0.45, overlap=False)
    assert tokens == pytest.approx((1 - alpha ** 5) / (1 - alpha))
    assert seconds == pytest.approx(4 * DRAFT_S + PASS(5))
    _, overlapped = expected(4, [alpha] * 4, 0.8, DRAFT_S, PASS, 0.45, overlap=True)
    hit = 0.8 * alpha ** 4
    during = 0.55 * PASS(5) / DRAFT_S  # tokens drafted while the other stages verify (2.7 here)
    assert overlapped == pytest.approx(PASS(5) + hit * DRAFT_S * (5 - during) + (1 - hit) * 4 * DRAFT_S)
    assert overlapped < seconds  # drafting hides behind the pass
    # A draft slower than the pass: at least the guess and one draft, then the pass waits.
    _, slow = expected(4, [alpha] * 4, 0.8, 1.0, PASS, 0.45, overlap=True)
    assert slow == pytest.approx(0.45 * PASS(5) + 2 + hit * 3 + (1 - hit) * 4)
    assert expected(0, [], 0.0, DRAFT_S, PASS, 0.45, overlap=True) == (1.0, PASS(1))


def test_pass_cost_is_fitted_to_the_measured_passes():
    cost = measured().pass_cost()
    assert cost is not None
    assert cost.fixed_s == pytest.approx(PASS.fixed_s)
    assert cost.per_position_s == pytest.approx(PASS.per_position_s)
    one_size = SpeculationCosts()
    one_size.record_pass(1, 0.3, None)
    assert one_size.pass_cost()(1) == pytest.approx(0.3)  # with a prior share per position


def test_a_draft_that_guesses_well_gets_a_long_window():
    choice = choose_window(counts_at(0.95), measured(draft_s=0.02), 1, 16, overlap=True)
    assert choice is not None and choice.window >= 6 and choice.gain > 1.5
    assert "window" in choice.reason and len(choice.accept_by_position) == choice.window


def test_a_dearer_draft_gets_a_shorter_window():
    counts = counts_at(0.85)
    cheap = choose_window(counts, measured(draft_s=0.02), 1, 16, overlap=False)
    dear = choose_window(counts, measured(draft_s=0.10), 1, 16, overlap=False)
    assert cheap is not None and dear is not None
    assert 0 < dear.window < cheap.window


def test_overlap_gains_most_where_the_pass_leaves_stage_0_waiting():
    counts = counts_at(0.7)
    far = measured(draft_s=0.12, cost=PassCost(0.5, 0.044), share=0.3)  # slow links: long round trips
    serial = choose_window(counts, far, 1, 16, overlap=False)
    overlapped = choose_window(counts, far, 1, 16, overlap=True)
    assert serial is not None and overlapped is not None
    assert overlapped.gain > serial.gain * 1.05


def test_drafting_turns_off_when_the_expected_gain_is_below_one():
    choice = choose_window(counts_at(0.1), measured(), 1, 16, overlap=True)
    assert choice is not None and choice.window == 0 and choice.gain < 1
    assert "< 1.00x" in choice.reason


def test_no_choice_before_costs_are_measured():
    assert choose_window(counts_at(0.9), SpeculationCosts(), 1, 16, overlap=True) is None


# ---------------------------------------------------------------- the policy over a request


def simulate(policy: WindowPolicy, tokens: int, alpha: float, *, draft_s: float = DRAFT_S,
             cost: PassCost = PASS, seed: int = 0, gated: bool = True) -> tuple[float, list[int]]:
    """Run the policy over `tokens` tokens of text on which drafts stand with chance `alpha`:
    seconds taken (by the synthetic costs) and the window of each step."""
    rng = random.Random(seed)
    done, seconds, windows = 0, 0.0, []
    first = True
    while done < tokens:
        window = 0 if first else policy.next_window(tokens - done - 1, gated=gated)
        first = False
        accepted = 0
        while accepted < window and rng.random() < alpha:
            accepted += 1
        step_s = draft_s * window + cost(window + 1)
        step = StepMeasurement(window, accepted, step_s, accepted + 1, positions=window + 1,
                               draft_s=draft_s * window if window else None, draft_tokens=window,
                               pass_s=cost(window + 1), stage0_share=0.45)
        policy.costs.record_step(step)  # as the loop does: the cost model, then the policy
        policy.record(step)
        windows.append(window)
        done += accepted + 1
        seconds += step_s
    return seconds, windows


def test_text_the_draft_cannot_guess_loses_under_five_percent_and_is_probed_again():
    costs = measured()
    simulate(AutoWindow(8, 2, 16, costs=costs), 128, 0.95)  # a request the draft guesses well
    assert costs.accept_prior > 0.6
    seconds, windows = simulate(AutoWindow(8, 2, 16, costs=costs), 128, 0.0)  # then prose
    plain = 128 * PASS(1)
    assert seconds / plain < 1.05, windows
    drafting = [i for i, w in enumerate(windows) if w]
    assert len(drafting) >= 2 and drafting[-1] > 40  # it probed again later
    assert all(windows[i] == 2 for i in drafting)  # probes are the smallest window


def test_the_auto_policy_drafts_long_windows_on_text_the_draft_guesses():
    costs = measured()
    seconds, windows = simulate(AutoWindow(8, 2, 16, costs=costs), 128, 0.95)
    assert windows[1] == 2  # the first speculative step probes
    assert min(windows[6:-3]) >= 3 and max(windows, key=windows.count) >= 4
    assert seconds < 0.7 * 128 * PASS(1)
    assert costs.last_choice is not None and costs.last_choice.window >= 3


def test_the_policy_probes_again_after_drafting_was_off_and_resumes_on_good_text():
    policy = AutoWindow(8, 2, 16, costs=measured(), gate=GateSettings(off_steps=4, max_off_steps=8))
    _, windows = simulate(policy, 12, 0.0)
    assert 0 in windows[2:] and policy.decision.drafting is False
    _, windows = simulate(policy, 60, 1.0)
    assert windows[-2] >= 4 and policy.decision.drafting and policy.decision.speedup > 1


def test_seeded_sampled_requests_keep_the_initial_window():
    policy = AutoWindow(5, 2, 16, costs=measured())
    _, windows = simulate(policy, 60, 0.0, gated=False)
    assert set(windows[1:-5]) == {5}  # (the last steps have less room)


def test_auto_is_a_window_policy_everywhere_windows_are_named():
    spec = WindowSpec.from_json({"window_policy": "auto", "initial_window": 4, "min_window": 1,
                                 "max_window": 8}).validate()
    assert spec.describe() == "auto window in [1, 8] (4 until measured)"
    assert isinstance(policy_for(spec), AutoWindow)
