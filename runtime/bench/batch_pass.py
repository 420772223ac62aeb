"""A batch pass of one-row sessions against a pass of one, through a package's layers.

`python -m layerline.runtime.bench.batch_pass PACKAGE [SESSIONS ...]` loads the package's
layers as one range (packed weights; on the CPU kernel where it is built), gives each of S
sessions a cache of 40-59 positions, and times `forward_rows` of one row per session (a
decode step of S sessions, as stage 0's scheduler runs it), the sizes taking turns so that a
busy machine slows each alike. Each pass rolls its caches back one position, so every pass
sees the same lengths. Wall time and the process's CPU time are both reported: on shared
cores the CPU time is the steadier measure of the work, the wall time what a client waits.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..decode.local_pipeline import LocalPipeline

CONTEXT = 40  # positions each session's cache holds before the pass (plus 0-19, differing)


@dataclass(frozen=True)
class BatchPass:
    sessions: int
    wall_ms: float  # median of the passes
    cpu_ms: float  # median CPU time of the process (every thread) per pass


def measure_batch_passes(package_dir: str | Path, sizes: tuple[int, ...] = (1, 8, 16),
                         passes: int = 15) -> list[BatchPass]:
    """Medians of `passes` passes (after 3 warm-up) of each number of one-row sessions."""
    layers = LocalPipeline.load(package_dir, None, "packed", tokenizer=False).ranges
    width = layers[0].hidden_size
    mx.random.seed(0)
    caches = {}
    for size in sizes:
        caches[size] = [[r.make_cache() for r in layers] for _ in range(size)]
        for i, session in enumerate(caches[size]):
            h = mx.random.normal((1, CONTEXT + (i * 7) % 20, width))
            for layer_range, cache in zip(layers, session, strict=True):
                h = layer_range(h, cache)
            mx.eval(h)
    rows = {size: mx.random.normal((1, size, width)) for size in sizes}
    mx.eval(list(rows.values()))
    timings: dict[int, list[tuple[float, float]]] = {size: [] for size in sizes}
    for _ in range(passes + 3):
        for size in sizes:
            started, cpu = time.perf_counter(), time.process_time()
            h = rows[size]
            for i, layer_range in enumerate(layers):
                h = layer_range.forward_rows(h, [session[i] for session in caches[size]], [1] * size)
            mx.eval(h)
            timings[size].append((time.perf_counter() - started, time.process_time() - cpu))
            for session in caches[size]:
                for cache in (c for range_caches in session for c in range_caches):
                    cache.trim(1)  # the next pass writes the same position again
    return [BatchPass(size, statistics.median(w for w, _ in timings[size][3:]) * 1000,
                      statistics.median(c for _, c in timings[size][3:]) * 1000) for size in sizes]


def main(argv: list[str]) -> None:
    sizes = tuple(int(s) for s in argv[1:]) or (1, 8, 16)
    results = measure_batch_passes(argv[0], sizes)
    wall_1, cpu_1 = results[0].wall_ms, results[0].cpu_ms
    print("| sessions | wall ms | × first | CPU ms | × first |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r.sessions} | {r.wall_ms:.1f} | {r.wall_ms / wall_1:.2f}× | {r.cpu_ms:.1f} | "
              f"{r.cpu_ms / cpu_1:.2f}× |")


if __name__ == "__main__":
    main(sys.argv[1:])
