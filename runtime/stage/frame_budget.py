"""How long a frame may take at the next stage before it is given up: a fixed allowance per
later stage, plus what the frame's positions took lately."""

from __future__ import annotations

import threading

DEFAULT_FRAME_TIMEOUT_S = 10.0


class FrameBudget:
    """How long a frame of `n` positions may take downstream: a fixed allowance plus what
    `n` positions took lately (seconds per position, averaged), with room to spare."""

    MARGIN = 4.0  # a frame may take this many times the recent per-position cost
    FIRST_GUESS_S = 0.05  # per position, until frames were measured (a slow CPU's prefill)

    def __init__(self, base_s: float = DEFAULT_FRAME_TIMEOUT_S) -> None:
        self.base_s = base_s
        self._per_position_s = self.FIRST_GUESS_S
        self._lock = threading.Lock()

    def seconds(self, positions: int) -> float:
        with self._lock:
            return self.base_s + self.MARGIN * positions * self._per_position_s

    def record(self, positions: int, seconds: float) -> None:
        """Learn from a frame that took `seconds` for `positions`."""
        with self._lock:
            self._per_position_s = 0.8 * self._per_position_s + 0.2 * seconds / max(positions, 1)
