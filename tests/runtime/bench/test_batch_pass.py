"""The batch-pass measurement: passes of one-row sessions through a real package's layers."""

from __future__ import annotations

from layerline.runtime.bench.batch_pass import measure_batch_passes


def test_batch_passes_are_timed_per_number_of_sessions(smollm2_package):
    results = measure_batch_passes(smollm2_package, (1, 3), passes=1)
    assert [r.sessions for r in results] == [1, 3]
    assert all(r.wall_ms > 0 and r.cpu_ms > 0 for r in results)
