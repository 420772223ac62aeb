"""The batching policy alone: when a lane passes and which rows its pass takes (no threads, no model)."""

from __future__ import annotations

from dataclasses import dataclass

from layerline.runtime.stage0.pick import (
    MAX_PATIENCE_S,
    PROMPT_ROWS_BESIDE_STEPS,
    STEP_ROWS,
    Pace,
    is_step,
    pick,
)

NOW = 100.0


@dataclass(eq=False)
class Sub:
    session: str
    queued_at: float
    left: int
    whole: bool = False  # a tree


def run_now(queue: list[Sub], *, max_batch: int = 16, max_rows: int = 512) -> list[tuple[str, int]]:
    """What a pass over `queue` takes when every session of the lane has submitted."""
    paces = {sub.session: Pace(answered_at=0.0) for sub in queue}
    batch = pick(queue, NOW, paces=paces, pass_s=0.01, max_batch=max_batch, max_rows=max_rows)
    assert batch.wait_until is None and batch.everyone
    return [(sub.session, rows) for sub, rows in batch.picks]


def test_a_step_is_at_most_step_rows():
    assert is_step(1) and is_step(STEP_ROWS) and not is_step(STEP_ROWS + 1)


def test_a_lone_session_passes_at_once():
    sub = Sub("a", NOW, 1)
    batch = pick([sub], NOW, paces={"a": Pace(answered_at=NOW - 1)}, pass_s=0.01, max_batch=4, max_rows=64)
    assert batch.wait_until is None and batch.everyone and batch.picks == [(sub, 1)]


def test_a_session_due_back_soon_is_waited_for_but_not_past_the_patience():
    queue = [Sub("a", NOW, 1)]
    soon = {"a": Pace(answered_at=NOW), "b": Pace(answered_at=NOW - 0.001, turnaround_s=0.004)}
    waited = pick(queue, NOW, paces=soon, pass_s=0.01, max_batch=4, max_rows=64)
    assert waited.picks == [] and waited.wait_until == NOW - 0.001 + 2 * 0.004
    slow = {"a": Pace(answered_at=NOW), "b": Pace(answered_at=NOW, turnaround_s=1.0)}
    capped = pick(queue, NOW, paces=slow, pass_s=0.01, max_batch=4, max_rows=64)
    assert capped.wait_until == NOW + MAX_PATIENCE_S
    late = pick(queue, NOW + MAX_PATIENCE_S, paces=slow, pass_s=0.01, max_batch=4, max_rows=64)
    assert late.wait_until is None and not late.everyone and [s.session for s, _ in late.picks] == ["a"]


def test_a_session_answered_a_moment_ago_is_waited_for_a_share_of_a_pass():
    queue = [Sub("a", NOW, 1)]
    paces = {"a": Pace(answered_at=NOW), "b": Pace(answered_at=NOW - 0.001, turnaround_s=0.0)}
    batch = pick(queue, NOW, paces=paces, pass_s=0.02, max_batch=4, max_rows=64)
    assert batch.wait_until == NOW - 0.001 + 0.25 * 0.02


def test_a_late_session_is_not_waited_for():
    queue = [Sub("a", NOW, 1)]
    paces = {"a": Pace(answered_at=NOW), "b": Pace(answered_at=NOW - 1.0)}
    batch = pick(queue, NOW, paces=paces, pass_s=0.01, max_batch=4, max_rows=64)
    assert batch.wait_until is None and not batch.everyone and len(batch.picks) == 1


def test_a_pace_follows_the_time_a_session_takes_to_submit_again():
    pace = Pace(answered_at=10.0, turnaround_s=0.005)
    pace.submitted(10.010)
    assert abs(pace.turnaround_s - (0.8 * 0.005 + 0.2 * 0.010)) < 1e-12


def test_a_pass_takes_the_oldest_submission_of_each_session_first_come_first_served():
    queue = [Sub("b", 2.0, 1), Sub("a", 1.0, 1), Sub("a", 3.0, 2), Sub("c", 4.0, 1)]
    assert run_now(queue) == [("a", 1), ("b", 1), ("c", 1)]


def test_a_pass_takes_at_most_max_batch_sessions():
    queue = [Sub(name, float(i), 1) for i, name in enumerate("abcd")]
    assert run_now(queue, max_batch=2) == [("a", 1), ("b", 1)]


def test_steps_go_before_an_older_prompt_which_takes_a_bounded_chunk_beside_them():
    queue = [Sub("prompt", 1.0, 1000), Sub("step", 2.0, 5)]
    assert run_now(queue) == [("step", 5), ("prompt", PROMPT_ROWS_BESIDE_STEPS)]


def test_a_prompt_alone_takes_every_row_of_the_pass_and_the_next_prompt_none():
    queue = [Sub("first", 1.0, 1000), Sub("second", 2.0, 300)]
    assert run_now(queue, max_rows=512) == [("first", 512)]
    assert run_now([Sub("first", 1.0, 200), Sub("second", 2.0, 600)], max_rows=512) == [
        ("first", 200), ("second", 312)]


def test_a_step_is_never_cut_it_waits_for_a_pass_with_room():
    queue = [Sub("a", 1.0, 40), Sub("b", 2.0, 40), Sub("c", 3.0, 10)]
    assert run_now(queue, max_rows=64) == [("a", 40), ("c", 10)]


def test_the_rest_of_a_prompt_that_fits_a_step_rides_whole_with_the_steps():
    queue = [Sub("prompt", 1.0, 500), Sub("tail", 2.0, STEP_ROWS), Sub("step", 3.0, 1)]
    assert run_now(queue) == [("tail", STEP_ROWS), ("step", 1), ("prompt", PROMPT_ROWS_BESIDE_STEPS)]


def test_a_tree_goes_whole_into_one_pass_beside_steps_and_its_nodes_count_as_rows():
    # A tree larger than a step (were MAX_TREE_NODES above STEP_ROWS) is still never cut.
    queue = [Sub("a", NOW, STEP_ROWS + 6, whole=True), Sub("b", NOW + 1, 3), Sub("c", NOW + 2, 200)]
    assert run_now(queue, max_rows=STEP_ROWS + 10) == [("a", STEP_ROWS + 6), ("b", 3), ("c", 1)]
    assert run_now(queue, max_rows=STEP_ROWS) == [("b", 3), ("c", STEP_ROWS - 3)]  # it waits for room
