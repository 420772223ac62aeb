"""Planning which stage runs which layers."""

from __future__ import annotations

import pytest

from layerline.errors import LayerlineError
from layerline.runtime.stage.split_plan import parse_split, plan_split


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
