"""Where stage 0's target passes spend their time, summed over every request since start.

Each step of each request adds its drafting, its target pass (stage 0's own layers, every
other stage's compute, every hop's wire and queueing, the head, and the wait for the batch
pass that carried it) and deciding on the logits. `/v1/status` shows the averages per
pass; `--trace FILE` also writes every step as one JSON line. A step that verified a token
tree also counts under `trees` (nodes sent, accepted path), and its trace line carries `tree`.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, TextIO

from ..decode.loop import StepRecord


class PassProfile:
    """Sums of step parts (seconds) and counts; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._passes = 0
        self._positions = 0
        self._seconds: dict[str, float] = defaultdict(float)
        self._trees = self._tree_nodes = self._tree_paths = 0
        self._trace: TextIO | None = None

    def trace_to(self, trace_file: Path) -> None:
        """From now on, also append every step to `trace_file`, one JSON line each."""
        with self._lock:
            self._trace = open(trace_file, "a", encoding="utf-8")

    def record(self, request_id: str, step: StepRecord) -> None:
        parts = self.parts(step)
        with self._lock:
            self._passes += 1
            self._positions += step.positions
            for name, seconds in parts.items():
                self._seconds[name] += seconds
            tree = {}
            if step.tree_shape is not None:
                self._trees += 1
                self._tree_nodes += step.drafted
                self._tree_paths += step.accepted
                depth, width = step.tree_shape
                tree = {"tree": {"depth": depth, "width": width, "nodes": step.drafted,
                                 "reached": step.tree_depth, "path": step.accepted}}
            if self._trace is not None:
                line = {"request": request_id, "positions": step.positions, "drafted": step.drafted,
                        "accepted": step.accepted, "tokens": step.tokens, **tree,
                        **{name: round(seconds, 6) for name, seconds in parts.items()}}
                self._trace.write(json.dumps(line) + "\n")
                self._trace.flush()

    @staticmethod
    def parts(step: StepRecord) -> dict[str, float]:
        """A step's time by part, in seconds: `draft_s`, the target pass by stage and hop, `decide_s`."""
        clock = step.clock
        parts = {"draft_s": clock.draft_s, "target_s": clock.target_s, "decide_s": clock.decide_s}
        trace = step.trace
        if trace is not None:
            parts["stage0_s"] = trace.local_s
            for index, seconds in trace.stage_compute_s.items():
                parts[f"stage{index}_s"] = seconds
            for index, seconds in enumerate(trace.hops_s):
                parts[f"hop{index}_{index + 1}_s"] = seconds
            parts["head_s"] = trace.head_s
            if trace.queue_s:
                parts["queue_s"] = trace.queue_s  # waiting for the batch pass, and the hand-over
        return parts

    def to_json(self) -> dict[str, Any]:
        """Passes since start, positions per pass, and milliseconds per pass by part."""
        with self._lock:
            passes = self._passes
            per_pass = {name.removesuffix("_s") + "_ms": round(1000 * total / passes, 3)
                        for name, total in sorted(self._seconds.items())} if passes else {}
            positions = round(self._positions / passes, 3) if passes else 0
            trees = {"trees": {
                "passes": self._trees, "nodes_per_pass": round(self._tree_nodes / self._trees, 3),
                "path_per_pass": round(self._tree_paths / self._trees, 3)}} if self._trees else {}
            return {**trees, "passes": passes, "positions": self._positions, "positions_per_pass": positions,
                    "ms_per_pass": per_pass,
                    "seconds": {name: round(total, 6) for name, total in sorted(self._seconds.items())}}

    def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
