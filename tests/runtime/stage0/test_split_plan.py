"""Planning which stage runs which layers."""

from __future__ import annotations

import itertools
import random

import pytest

from layerline.errors import LayerlineError
from layerline.runtime.stage.split_plan import StageCapacity, parse_split, plan_by_capacity, plan_split


def test_equal_memory_gives_stage0_fewer_layers():
    ranges = plan_split(30, [16 << 30, 16 << 30, 16 << 30])
    assert ranges[0][0] == 0 and ranges[-1][1] == 30
    sizes = [e - s for s, e in ranges]
    assert sum(sizes) == 30 and sizes[0] < sizes[1] and abs(sizes[1] - sizes[2]) <= 1


def test_layers_follow_free_memory_and_every_stage_gets_one():
    sizes = [e - s for s, e in plan_split(24, [8 << 30, 32 << 30, 1 << 20])]
    assert sizes[1] > sizes[0] and sizes[2] == 1 and sum(sizes) == 24


def test_more_stages_than_layers_is_refused():
    with pytest.raises(LayerlineError, match="cannot split"):
        plan_split(2, [1, 1, 1])


def test_explicit_split_must_cover_all_layers_in_order():
    assert parse_split("0:10,10:30", 30) == [(0, 10), (10, 30)]
    for bad in ("0:10,12:30", "0:10,10:20", "5:30", "0:10,10:10,10:30", "a:b"):
        with pytest.raises(LayerlineError):
            parse_split(bad, 30)


def _brute_force_best(num_layers, stages):
    """The smallest slowest-stage time over every contiguous split that fits."""
    best = None
    for cuts in itertools.combinations(range(1, num_layers), len(stages) - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, num_layers), strict=True)]
        if any(c > s.max_layers for c, s in zip(counts, stages, strict=True)):
            continue
        worst = max(s.stage_s(c) for c, s in zip(counts, stages, strict=True))
        best = worst if best is None else min(best, worst)
    return best


def _slowest(ranges, stages):
    return max(s.stage_s(e - b) for (b, e), s in zip(ranges, stages, strict=True))


def test_heterogeneous_speeds_give_the_minimax_split():
    # Stage 2 is three times slower per layer; stage 0 also runs the head.
    stages = [StageCapacity(1.0, 99, extra_s=2.0), StageCapacity(1.0, 99), StageCapacity(3.0, 99)]
    ranges = plan_by_capacity(30, stages)
    assert ranges == [(0, 12), (12, 26), (26, 30)]
    assert _slowest(ranges, stages) == _brute_force_best(30, stages)


def test_minimax_split_matches_brute_force_on_random_capacities():
    rng = random.Random(7)
    for _ in range(200):
        n, count = rng.randint(3, 14), rng.randint(2, 3)
        stages = [StageCapacity(rng.uniform(0.1, 5.0), rng.randint(1, n), rng.uniform(0, 3) * (i == 0))
                  for i in range(count)]
        ranges = plan_by_capacity(n, stages)
        best = _brute_force_best(n, stages)
        if best is None:
            assert ranges is None
            continue
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(e - b <= s.max_layers and e > b for (b, e), s in zip(ranges, stages, strict=True))
        assert _slowest(ranges, stages) == pytest.approx(best)


def test_memory_caps_are_respected_even_when_the_capped_stage_is_fastest():
    stages = [StageCapacity(1.0, 5), StageCapacity(1.0, 99), StageCapacity(3.0, 99)]
    ranges = plan_by_capacity(30, stages)
    assert ranges[0] == (0, 5)
    assert plan_by_capacity(30, [StageCapacity(1.0, 5), StageCapacity(1.0, 5)]) is None
