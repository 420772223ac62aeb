"""The peers stage 0 may claim to replace a lost stage: those named with `--spare`, those a
discovery offers, and a lost peer that answers again (it rejoins as a spare, never claimed twice)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable


class SparePool:
    """Spare peers' control endpoints, in the order they are tried."""

    def __init__(self, endpoints: Iterable[str] = (),
                 find: Callable[[frozenset[str]], list[str]] | None = None) -> None:
        self._lock = threading.Lock()  # a discovery offers and withdraws from its own thread
        self._endpoints: list[str] = list(dict.fromkeys(endpoints))
        self._find = find  # `--discover`: free stages of the cluster found on the LAN, but these

    def look(self, exclude: set[str]) -> None:
        """With a discovery, offer the free stages it finds now (none of `exclude`), once no other
        spare is left to try; nothing without one."""
        if self._find is None or set(self.candidates()) - exclude:
            return
        for endpoint in self._find(frozenset(exclude)):
            self.offer(endpoint)

    def candidates(self) -> list[str]:
        """The spares to try now, first offered first."""
        with self._lock:
            return list(self._endpoints)

    def offer(self, endpoint: str) -> None:
        """Add a peer that may replace a lost stage (a discovered one, or a lost peer back)."""
        with self._lock:
            if endpoint not in self._endpoints:
                self._endpoints.append(endpoint)

    def withdraw(self, endpoint: str) -> None:
        """Forget a peer: it became a stage, or its advertisement went away."""
        with self._lock:
            if endpoint in self._endpoints:
                self._endpoints.remove(endpoint)
