"""Deadlines that fire a callback unless cleared first (one thread watches them all), and
the budget a frame gets before its deadline.

Frames that a stalled stage never answers and activation streams that stay idle are
both cut this way: the callback cancels the gRPC call, which unblocks whoever waits on it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("layerline.stage")

DEFAULT_FRAME_TIMEOUT_S = 10.0


class Deadlines:
    """Runs `callback()` at `time.monotonic() + seconds` for every armed deadline not cleared."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, callback: Callable[[], None]) -> int:
        """Call `callback` in `seconds` unless `clear(handle)` comes first; returns the handle."""
        with self._wake:
            handle = next(self._ids)
            self._callbacks[handle] = callback
            heapq.heappush(self._heap, (time.monotonic() + seconds, handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            self._wake.notify()
            return handle

    def clear(self, handle: int) -> bool:
        """Disarm one deadline; False if it already fired."""
        with self._wake:
            return self._callbacks.pop(handle, None) is not None

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][1] not in self._callbacks:
                    if self._heap:
                        heapq.heappop(self._heap)  # cleared: drop it
                        continue
                    self._wake.wait()
                when, handle = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._wake.wait(delay)
                    continue
                heapq.heappop(self._heap)
                callback = self._callbacks.pop(handle)
            try:
                callback()
            except Exception:  # a failing callback must not stop the other deadlines
                log.exception("event=deadline_callback_failed")



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
