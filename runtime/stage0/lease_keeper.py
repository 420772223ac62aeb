"""Stage 0 keeps its peers' leases: one thread and one channel per peer, renewing on a fixed
schedule whatever the peer's health checks, the other peers or the requests are doing.

A renewal is an Inventory (a fenced call, which renews the lease where the stage receives
it). Renewals are due every quarter lease, counted from when the last one was sent, not
from when it was answered; one that fails is retried at once, with a deadline of the
lease left, so a single slow answer never costs a whole renewal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from layerline.errors import StageUnavailableError
from layerline.proto import stage_control_pb2 as pb

from ..stage.client import StageClient

log = logging.getLogger("layerline.coordinator")

RETRY_PAUSE_S = 0.05  # after a first failed renewal; doubled after each next one, up to the interval
MIN_CALL_S = 0.25  # a renewal's shortest deadline (the lease may already be as good as gone)


@dataclass
class LeaseRecord:
    """How one peer's renewals went: counts and the longest silence between two of them."""

    renewals: int = 0
    failures: int = 0
    longest_gap_s: float = 0.0
    last_sent: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict:
        return {"renewals": self.renewals, "failures": self.failures,
                "longest_gap_s": round(self.longest_gap_s, 3)}


class LeaseKeeper:
    """Renews the leases of the peers it is told to keep, each on a thread of its own."""

    def __init__(self, lease_s: float, make_client: Callable[[str], StageClient],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self.interval_s = lease_s / 4
        self._make_client = make_client
        self._clock = clock
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._stops: dict[str, threading.Event] = {}  # one per peer: drop() ends one renewal
        self.records: dict[str, LeaseRecord] = {}

    def keep(self, endpoint: str) -> None:
        """Start renewing `endpoint`'s lease (claimed already); nothing if it is kept already."""
        if endpoint in self._threads or self._stop.is_set():
            return
        self.records[endpoint] = LeaseRecord(last_sent=self._clock())
        stop = self._stops[endpoint] = threading.Event()
        thread = threading.Thread(target=self._renew_forever, args=(endpoint, stop), daemon=True,
                                  name=f"lease-{endpoint}")
        self._threads[endpoint] = thread
        thread.start()

    def drop(self, endpoint: str) -> None:
        """Stop renewing `endpoint`'s lease (released, or lost and replaced); nothing if not kept."""
        stop = self._stops.pop(endpoint, None)
        if stop is not None:
            stop.set()
            self._threads.pop(endpoint, None)

    def stop(self, wait_s: float = 2.0) -> None:
        """Stop every renewal (before the peers are released), waiting at most `wait_s` in all for
        the calls in flight (one still in flight later is harmless: a released stage rejects it)."""
        self._stop.set()
        for stop in self._stops.values():
            stop.set()
        deadline = self._clock() + wait_s
        for thread in self._threads.values():
            thread.join(timeout=max(0.0, deadline - self._clock()))

    def _renew_forever(self, endpoint: str, stop: threading.Event) -> None:
        client = self._make_client(endpoint)  # a channel of its own: never behind other calls
        record = self.records[endpoint]
        failures = 0  # in a row
        try:
            while not stop.is_set():
                sent = self._clock()
                left = record.last_sent + self.lease_s - sent
                try:
                    client.call(timeout_s=max(MIN_CALL_S, left), inventory=pb.InventoryRequest())
                except StageUnavailableError as exc:
                    record.failures += 1
                    if not failures:
                        log.warning("event=lease_renewal_failed endpoint=%s error=%s", endpoint, exc.message)
                    stop.wait(min(self.interval_s, RETRY_PAUSE_S * 2 ** failures))
                    failures += 1
                    continue
                if failures:
                    log.info("event=lease_renewed_again endpoint=%s after=%d", endpoint, failures)
                    failures = 0
                record.renewals += 1
                record.longest_gap_s = max(record.longest_gap_s, sent - record.last_sent)
                record.last_sent = sent
                stop.wait(max(0.0, sent + self.interval_s - self._clock()))
        finally:
            client.close()
