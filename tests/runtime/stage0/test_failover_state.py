"""What stage 0's lanes and coordinator share during a failover, and the pool of spares."""

from __future__ import annotations

import threading

import pytest

from layerline.errors import StageUnavailableError
from layerline.runtime.stage0.failover import Failover
from layerline.runtime.stage0.spares import SparePool


def test_spares_are_tried_in_the_order_given_and_each_once():
    pool = SparePool(["a:1", "b:1", "a:1"])
    pool.offer("c:1")
    pool.offer("b:1")
    assert pool.candidates() == ["a:1", "b:1", "c:1"]
    pool.withdraw("a:1")
    pool.offer("a:1")  # a lost peer back: it rejoins last
    assert pool.candidates() == ["b:1", "c:1", "a:1"]


def test_a_waiting_pass_goes_on_at_the_repair_and_the_pause_is_reported():
    failover = Failover(30.0, first_peer="p1:1")
    pause = failover.begin(1, (2, 3), "p1:1")
    assert failover.state == "recovering"
    repair = threading.Timer(0.1, failover.repaired, args=(pause, "spare:1"))
    repair.start()
    assert failover.wait(0) == 1
    failover.replayed(4)
    assert failover.state == "ok" and failover.first_peer == "spare:1"
    reported = failover.to_json()["pauses"][-1]
    assert reported["state"] == "repaired" and reported["replayed_sessions"] == 4
    assert reported["replayed_s"] is not None


def test_a_degraded_pipeline_fails_the_waiting_passes_with_its_error_until_a_repair():
    failover = Failover(30.0)
    pause = failover.begin(2, (3, 4), "p2:1")
    threading.Timer(0.1, failover.degrade, args=(pause, "stage 2 was lost and no spare replaced it")).start()
    with pytest.raises(StageUnavailableError, match="no spare replaced it"):
        failover.wait(0)
    assert failover.state == "degraded"
    failover.repaired(pause, "p1:1")  # the search went on, and found one
    assert failover.state == "ok" and failover.wait(0) == 1
