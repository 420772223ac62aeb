"""Admission control on stage 0: at most `max_active` requests decode, `max_queue` more wait.

Every stage holds at most `--max-sessions` KV caches and refuses more rather than evict
one in use, so stage 0 lets no more requests run than that. A request beyond the
running ones and the queue is refused at once (HTTP 429, before any token is sent).
"""

from __future__ import annotations

import threading
import time

from layerline.errors import LayerlineError

DEFAULT_MAX_BATCH = 16  # requests that decode at once (`--max-batch`), at most `--max-sessions`
DEFAULT_MAX_QUEUE = 32  # requests that may wait for a slot beyond those (`--max-queue`)
DEFAULT_DRAIN_S = 5.0  # after SIGTERM, how long requests in flight may finish (`--drain-seconds`)


class ServerBusyError(LayerlineError):
    """Every decoding slot and every queue place is taken."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, hint=f"retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDownError(LayerlineError):
    """The server is stopping and takes no new work."""


class Admission:
    """Slots for decoding requests and a bounded queue in front of them."""

    def __init__(self, max_active: int, max_queue: int) -> None:
        if max_active < 1 or max_queue < 0:
            raise LayerlineError(f"need max_active >= 1 and max_queue >= 0, got {max_active}, {max_queue}")
        self.max_active = max_active
        self.max_queue = max_queue
        self._active = 0
        self._waiting = 0
        self._closed = False
        self._seconds_per_request = 5.0  # recent request duration, for Retry-After
        self._changed = threading.Condition()

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return self._waiting

    def enter(self) -> Ticket:
        """A place to decode now or in the queue; ServerBusyError when there is none."""
        with self._changed:
            if self._closed:
                raise ShuttingDownError("the server is shutting down", hint="send the request elsewhere")
            if self._active + self._waiting >= self.max_active + self.max_queue:
                retry = max(1, round(self._seconds_per_request * (self._waiting + 1) / self.max_active))
                raise ServerBusyError(
                    f"the server is busy: {self._active} requests decode and {self._waiting} wait, "
                    "its most", retry)
            self._waiting += 1
            return Ticket(self)

    def close(self) -> None:
        """Take no new requests; wake the queued ones, which then fail."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _wait_for_slot(self) -> None:
        with self._changed:
            while self._active >= self.max_active and not self._closed:
                self._changed.wait()
            self._waiting -= 1
            if self._closed:
                self._changed.notify_all()
                raise ShuttingDownError("the server is shutting down", hint="send the request elsewhere")
            self._active += 1

    def _leave(self, started: float | None, queued: bool) -> None:
        with self._changed:
            if queued:
                self._waiting -= 1
            else:
                self._active -= 1
                if started is not None:
                    seconds = time.monotonic() - started
                    self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * seconds
            self._changed.notify_all()


class Ticket:
    """One admitted request: `wait()` for a decoding slot, `release()` when done (idempotent)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._started: float | None = None
        self._state = "queued"  # queued -> active -> released

    def wait(self) -> None:
        """Block until the request may decode (raises ShuttingDownError when the server stops)."""
        if self._state != "queued":
            return
        try:
            self._admission._wait_for_slot()
        except ShuttingDownError:
            self._state = "released"
            raise
        self._state, self._started = "active", time.monotonic()

    def release(self) -> None:
        if self._state == "released":
            return
        self._admission._leave(self._started, queued=self._state == "queued")
        self._state = "released"
