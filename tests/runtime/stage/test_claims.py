"""Claim fencing on one stage: holder, terms, pre-emption, leases."""

from __future__ import annotations

import pytest

from layerline.runtime.stage.claims import ClaimRejected, ClaimTable, RejectReason

from helpers import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock(100.0)


@pytest.fixture
def table(clock: Clock) -> ClaimTable:
    return ClaimTable(clock=clock)


def claim(table: ClaimTable, who: str, term: int, run: str = "run-1", lease: float = 10.0):
    return table.claim(who, term, run, "pkg", "sha", lease)


def test_free_stage_accepts_a_claim_and_obeys_only_its_holder(table):
    held, preempted = claim(table, "coord-a", 1)
    assert (held.coordinator_id, held.term, preempted) == ("coord-a", 1, None)
    assert table.check("coord-a", 1).coordinator_id == "coord-a"
    with pytest.raises(ClaimRejected) as caught:
        table.check("coord-b", 1)
    assert caught.value.reason is RejectReason.CLAIMED_BY_OTHER
    assert (caught.value.holder.coordinator_id, caught.value.holder.term) == ("coord-a", 1)


def test_lower_or_equal_term_from_another_coordinator_is_rejected_with_the_holders_term(table):
    claim(table, "coord-a", 5)
    for term in (4, 5):
        with pytest.raises(ClaimRejected) as caught:
            claim(table, "coord-b", term, run="run-2")
        assert caught.value.reason is RejectReason.STALE_TERM
        assert caught.value.holder.term == 5
        assert "term 5" in caught.value.message


def test_higher_term_preempts_the_holder(table):
    first, _ = claim(table, "coord-a", 1)
    second, preempted = claim(table, "coord-b", 2, run="run-2")
    assert second.coordinator_id == "coord-b"
    assert preempted == first
    with pytest.raises(ClaimRejected) as caught:
        table.check("coord-a", 1)
    assert caught.value.reason is RejectReason.STALE_TERM


def test_holder_may_reclaim_at_the_same_term(table):
    claim(table, "coord-a", 3)
    again, preempted = claim(table, "coord-a", 3)
    assert again.term == 3 and preempted is None


def test_expired_lease_frees_the_stage(table, clock):
    claim(table, "coord-a", 7, lease=5.0)
    clock.now += 5.1
    assert table.holder is None
    with pytest.raises(ClaimRejected) as caught:
        table.check("coord-a", 7)
    assert caught.value.reason is RejectReason.NOT_CLAIMED
    held, _ = claim(table, "coord-b", 1, run="run-2")  # any term may take a free stage
    assert held.coordinator_id == "coord-b"


def test_every_request_of_the_holder_renews_its_lease(table, clock):
    claim(table, "coord-a", 1, lease=5.0)
    for _ in range(4):
        clock.now += 4.0
        table.check("coord-a", 1)
    assert table.holder is not None


def test_a_request_longer_than_the_lease_keeps_it_and_renews_it_when_answered(table, clock):
    claim(table, "coord-a", 1, lease=5.0)
    with table.answering("coord-a", 1):
        clock.now += 30.0  # a Load that outlasts the lease
        assert table.holder is not None
    clock.now += 4.0
    assert table.holder is not None  # renewed when it was answered, not when it arrived
    clock.now += 1.1
    assert table.holder is None
    with pytest.raises(ClaimRejected), table.answering("coord-a", 1):
        pass


def test_release_frees_the_stage_only_for_the_holder(table):
    claim(table, "coord-a", 1)
    with pytest.raises(ClaimRejected):
        table.release("coord-b", 1)
    table.release("coord-a", 1)
    assert table.holder is None
