"""Which stage runs which layers: planned from measured capacity, from free memory, or given as
`0:10,10:30`."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from layerline.errors import LayerlineError

# Stage 0 also holds the embedding, the head, the draft model and the HTTP frontend.
STAGE0_SHARE = 0.5


def parse_split(text: str, num_layers: int) -> list[tuple[int, int]]:
    """Ranges from `a:b,b:c,...`, which must cover 0..num_layers contiguously."""
    ranges = []
    try:
        for part in text.split(","):
            start, end = part.strip().split(":")
            ranges.append((int(start), int(end)))
    except ValueError as exc:
        raise LayerlineError(f"cannot read split {text!r}", hint="write it as 0:10,10:20,20:30") from exc
    check_split(ranges, num_layers)
    return ranges


def check_split(ranges: list[tuple[int, int]], num_layers: int) -> None:
    """Raise unless the ranges are non-empty and cover [0, num_layers) in order, without gaps."""
    expected = 0
    for start, end in ranges:
        if start != expected or end <= start:
            raise LayerlineError(
                f"split {ranges} must cover layers 0..{num_layers} in order, without gaps or empty ranges",
                hint=f"for example 0:{num_layers // 2},{num_layers // 2}:{num_layers}")
        expected = end
    if expected != num_layers:
        raise LayerlineError(f"split {ranges} ends at layer {expected}, but the model has {num_layers}",
                             hint=f"make the last range end at {num_layers}")


def plan_split(num_layers: int, free_memory: list[int], stage0_share: float = STAGE0_SHARE
               ) -> list[tuple[int, int]]:
    """Layers in proportion to each stage's free memory (stage 0 weighted down), at least one each."""
    stages = len(free_memory)
    if stages > num_layers:
        raise LayerlineError(f"{stages} stages cannot split {num_layers} layers",
                             hint="use fewer peers")
    weights = [max(float(m), 1.0) for m in free_memory]
    weights[0] *= stage0_share
    total = sum(weights)
    spare = num_layers - stages  # one layer each is given first
    shares = [w / total * spare for w in weights]
    counts = [1 + int(s) for s in shares]
    # Largest remainders take the layers the floor left over.
    order = sorted(range(stages), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in order[: num_layers - sum(counts)]:
        counts[i] += 1
    return _consecutive(counts)


@dataclass(frozen=True)
class StageCapacity:
    """What one stage offers a split: its measured time per layer and the layers it can hold."""

    layer_s: float  # seconds one layer takes there (a probe's `LayerTiming.layer_s`)
    max_layers: int  # the most layers its memory holds, KV headroom included
    extra_s: float = 0.0  # time it spends besides its layers (stage 0: the head)

    def stage_s(self, layers: int) -> float:
        """Seconds the stage takes per pass over `layers` layers."""
        return layers * self.layer_s + self.extra_s


def plan_by_capacity(num_layers: int, stages: list[StageCapacity]) -> list[tuple[int, int]] | None:
    """The contiguous split, in stage order, whose slowest stage is fastest (minimise the max of
    `stage_s`), each stage holding 1 to `max_layers` layers; None when the layers do not fit."""
    if len(stages) > num_layers or any(s.max_layers < 1 for s in stages):
        return None
    if sum(min(s.max_layers, num_layers) for s in stages) < num_layers:
        return None
    # The best bound is some stage's time at some layer count: the smallest one that fits all.
    bounds = sorted({s.stage_s(k) for s in stages for k in range(1, min(s.max_layers, num_layers) + 1)})
    def fits(bound_s: float) -> bool:  # every stage takes a layer, and all of them fit
        most = [_most_layers(s, bound_s, num_layers) for s in stages]
        return min(most) >= 1 and sum(most) >= num_layers

    lo, hi = 0, len(bounds) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(bounds[mid]):
            hi = mid
        else:
            lo = mid + 1
    counts = [_most_layers(s, bounds[lo], num_layers) for s in stages]
    # Too many layers now: take the surplus off whichever stage is slowest at the time, so that
    # the stages below the bound are balanced too.
    for _ in range(sum(counts) - num_layers):
        slowest = max((i for i, c in enumerate(counts) if c > 1),
                      key=lambda i: (stages[i].stage_s(counts[i]), -i))
        counts[slowest] -= 1
    return _consecutive(counts)


def _consecutive(counts: list[int]) -> list[tuple[int, int]]:
    """Layer ranges, from 0, of the given sizes in order."""
    ends = list(itertools.accumulate(counts))
    return [(end - count, end) for count, end in zip(counts, ends, strict=True)]


def _most_layers(stage: StageCapacity, bound_s: float, num_layers: int) -> int:
    """The most layers `stage` runs within `bound_s` and its memory."""
    if stage.layer_s <= 0:
        return min(stage.max_layers, num_layers)
    fit = math.floor((bound_s - stage.extra_s) / stage.layer_s * (1 + 1e-9))  # a bound is k * layer_s + extra
    return max(0, min(stage.max_layers, num_layers, fit))
