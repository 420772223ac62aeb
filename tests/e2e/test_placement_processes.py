"""Placement by measured capacity with real processes: a peer slowed by a busy core gets fewer layers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import Stage0Process, StageProcess

BUSY_LOOPS = 8  # on the slowed peer's core: it gets about a ninth of it (other work shares both cores)


@pytest.fixture
def busy_core():
    """Pin BUSY_LOOPS spinning processes to one core; yield the (slow, free) cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores: one slowed, one not")
    slow, fast = cores[0], cores[1]
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                 preexec_fn=lambda: os.sched_setaffinity(0, {slow}))
                for _ in range(BUSY_LOOPS)]
    yield slow, fast
    for spinner in spinners:
        spinner.kill()
        spinner.wait(timeout=10)


@pytest.mark.slow
def test_a_peer_on_a_busy_core_gets_fewer_layers_and_status_says_why(smollm2_package, tmp_path: Path,
                                                                    busy_core):
    slow_core, fast_core = busy_core
    cache = tmp_path / "cache"
    cache.mkdir()
    fast = StageProcess((), cache, cpus=frozenset({fast_core}))
    slow = StageProcess((), cache, cpus=frozenset({slow_core}))
    stage0 = None
    try:
        stage0 = Stage0Process(smollm2_package, [fast.endpoint, slow.endpoint], cache,
                               cpus=frozenset({fast_core}))
        status = stage0.status()
        placement = status["placement"]
        assert placement["source"] == "measured", placement
        stages = placement["stages"]
        sizes = [end - start for start, end in status["split"]]
        # Equal free memory planned fast and slow peers alike before; now the busy one does less.
        assert sizes[2] < sizes[1], placement
        assert stages[2]["layer_ms"] > stages[1]["layer_ms"], placement
        assert all(s["layer_ms"] and s["memory_free_bytes"] and s["max_layers"] for s in stages)
        assert "slowest stage" in placement["reason"]
        reply = stage0.client.completions.create(model=status["model"], prompt="The capital of France is",
                                                 max_tokens=4, temperature=0)
        assert reply.choices[0].text
    finally:
        if stage0 is not None:
            stage0.stop()
        slow.stop()
        fast.stop()
