"""Where the layers go: stage 0's split from each stage's measured layer time and free memory.

Each stage reports, when claimed, its free memory and how long a synthetic layer of the model's
shape takes there (`layer_probe.py`); stage 0 measures its own range the same way. The split
then minimises the slowest stage's time per pass (layers × time per layer, plus the head's on
stage 0), each stage holding no more layers than its memory takes with the KV caches of
`max_sessions` full contexts beside them. A stage that reports no time (an older layerline, a
failed probe) or layers that do not fit so leave the split to free memory alone, as before;
`--split` overrides both. The plan records why, for /v1/status and the dashboard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from layerline.packager.manifest import Manifest

from ..model.layer_shape import LayerShape, LayerTiming
from ..stage.split_plan import StageCapacity, plan_by_capacity, plan_split

log = logging.getLogger("layerline.coordinator")

MEMORY_SHARE = 0.8  # of a stage's free memory, what its weights and KV caches may take
KV_BYTES = 4  # per cached value: f32, the CPU's compute type (an over-estimate on a GPU's f16)


@dataclass(frozen=True)
class StageReport:
    """What stage 0 knows of one stage when it plans."""

    endpoint: str  # "local" for stage 0
    memory_free_bytes: int
    timing: LayerTiming | None  # None: the stage measured nothing
    why_not_measured: str = ""


@dataclass(frozen=True)
class Placement:
    """A split and why: its source ("measured", "memory" or "split") and each stage's numbers."""

    ranges: list[tuple[int, int]]
    source: str
    reason: str
    reports: list[StageReport]
    capacities: list[StageCapacity] | None  # None where the stages were not all measured

    def stage_s(self) -> list[float | None]:
        """Each stage's planned seconds per pass, where measured."""
        if self.capacities is None:
            return [None] * len(self.ranges)
        return [c.stage_s(e - s) for c, (s, e) in zip(self.capacities, self.ranges, strict=True)]

    def to_json(self) -> dict:
        """For /v1/status: the source, the reason, and per stage its layers, time and memory."""
        stages = []
        for i, ((start, end), report, stage_s) in enumerate(
                zip(self.ranges, self.reports, self.stage_s(), strict=True)):
            timing = report.timing
            capacity = self.capacities[i] if self.capacities is not None else None
            stages.append({
                "stage": i, "endpoint": report.endpoint, "layers": [start, end],
                "layer_ms": _ms(timing.layer_s) if timing else None,
                "one_row_ms": _ms(timing.one_row_s) if timing else None,
                "batch_ms": _ms(timing.batch_s) if timing else None,
                "batch_rows": timing.batch_rows if timing else None,
                "weight_format": timing.weight_format if timing else None,
                "extra_ms": _ms(capacity.extra_s) if capacity is not None else None,
                "stage_ms": _ms(stage_s) if stage_s is not None else None,
                "memory_free_bytes": report.memory_free_bytes,
                "max_layers": capacity.max_layers if capacity is not None else None,
                "not_measured": report.why_not_measured or None})
        return {"source": self.source, "reason": self.reason, "stages": stages}


def place(manifest: Manifest, shape: LayerShape | None, reports: list[StageReport], *, context_length: int,
          max_sessions: int) -> Placement:
    """Plan the split of stage 0 (reports[0]) and its peers from what they reported (by free
    memory when any stage measured nothing)."""
    n = manifest.num_layers
    unmeasured = [(i, r) for i, r in enumerate(reports) if r.timing is None]
    if unmeasured:
        i, report = unmeasured[0]
        return _by_memory(manifest, reports, f"stage {i} ({report.endpoint}) measured no layer time "
                          f"({report.why_not_measured or 'no probe'}): planned from free memory")
    assert shape is not None  # every stage measured the shape
    capacities = [capacity(manifest, shape, r, stage0=i == 0, context_length=context_length,
                           max_sessions=max_sessions) for i, r in enumerate(reports)]
    ranges = plan_by_capacity(n, capacities)
    if ranges is None:
        return _by_memory(manifest, reports,
                          f"the {n} layers do not fit the stages' memory with KV caches for {max_sessions} "
                          f"sessions of {context_length} tokens (at most "
                          f"{', '.join(str(c.max_layers) for c in capacities)} layers): planned from free "
                          "memory")
    times = [c.stage_s(end - start) for c, (start, end) in zip(capacities, ranges, strict=True)]
    slowest = max(range(len(times)), key=lambda i: times[i])
    start, end = ranges[slowest]
    head = f" + the head's {capacities[slowest].extra_s * 1000:.1f} ms" if slowest == 0 else ""
    reason = (f"measured: the slowest stage, {slowest}, takes {times[slowest] * 1000:.1f} ms a pass "
              f"({end - start} layers × {capacities[slowest].layer_s * 1000:.2f} ms{head}); no other split "
              "within every stage's memory has a faster slowest stage")
    return Placement(ranges, "measured", reason, reports, capacities)


def capacity(manifest: Manifest, shape: LayerShape, report: StageReport, *, stage0: bool,
             context_length: int, max_sessions: int) -> StageCapacity:
    """A measured stage's time per layer and the layers its memory holds; stage 0 also holds and
    runs the embedding and the head."""
    timing = report.timing
    assert timing is not None
    kv_per_layer = shape.kv_bytes_per_position(KV_BYTES) * context_length * max_sessions
    extra_s, fixed = 0.0, 0
    if stage0:
        vocab = int(manifest.config.get("vocab_size") or 0)
        # The head is one product as wide as the vocabulary: it costs what a layer does per weight.
        extra_s = timing.layer_s * vocab * shape.hidden_size / shape.weights()
        stored_layer = manifest.file(manifest.layers[0]).bytes
        held = timing.layer_bytes / stored_layer if stored_layer else 1.0  # expanded as the layers are
        fixed = int(sum(manifest.file(path).bytes for path in set(manifest.shared.values())) * held)
    usable = report.memory_free_bytes * MEMORY_SHARE - fixed
    max_layers = max(0, int(usable // (timing.layer_bytes + kv_per_layer)))
    return StageCapacity(layer_s=timing.layer_s, max_layers=max_layers, extra_s=extra_s)


def given(ranges: list[tuple[int, int]], reports: list[StageReport]) -> Placement:
    """The split `--split` gave."""
    return Placement(list(ranges), "split", "given by --split", reports, None)


def _by_memory(manifest: Manifest, reports: list[StageReport], reason: str) -> Placement:
    ranges = plan_split(manifest.num_layers, [r.memory_free_bytes for r in reports])
    return Placement(ranges, "memory", reason, reports, None)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
