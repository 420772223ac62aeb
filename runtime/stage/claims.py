"""Fenced claims on a stage: one coordinator at a time, by term, for a lease.

A stage obeys only the holder of its current claim. A higher term pre-empts
the holder; a lapsed lease frees the stage. Any request the holder makes
renews its lease, and the lease does not run while the stage is still answering
one: a Load longer than the lease leaves the claim held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum

from layerline.errors import LayerlineError

log = logging.getLogger("layerline.stage")

MAX_LEASE_S = 120.0  # the longest lease a stage grants: a dead holder's claim lapses within it
DEFAULT_LEASE_S = 60.0  # the lease stage 0 asks for unless told (`--lease-seconds`)


class RejectReason(Enum):
    CLAIMED_BY_OTHER = "claimed_by_other"
    STALE_TERM = "stale_term"
    NOT_CLAIMED = "not_claimed"


@dataclass(frozen=True)
class Claim:
    coordinator_id: str
    term: int
    run_id: str
    package_ref: str
    manifest_sha256: str
    lease_s: float
    expires_at: float  # on the table's clock


class ClaimRejected(LayerlineError):
    """A request from someone who does not hold the stage's claim."""

    def __init__(self, reason: RejectReason, message: str, holder: Claim | None) -> None:
        super().__init__(message, hint="re-claim the stage with a higher term, or wait for its lease")
        self.reason = reason
        self.holder = holder


class ClaimTable:
    """The claim state of one stage; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._holder: Claim | None = None
        self._answering: Counter[tuple[str, int]] = Counter()  # holder requests being answered

    def _live_holder(self) -> Claim | None:
        holder = self._holder
        if holder is not None and not self._answering[(holder.coordinator_id, holder.term)] \
                and self._clock() >= holder.expires_at:
            self._holder = None  # the lease lapsed: the stage is free again
            log.warning("event=lease_lapsed coordinator=%s term=%d silent_s=%.2f", holder.coordinator_id,
                        holder.term, self._clock() - holder.expires_at + holder.lease_s)
        return self._holder

    @property
    def holder(self) -> Claim | None:
        with self._lock:
            return self._live_holder()

    def claim(self, coordinator_id: str, term: int, run_id: str, package_ref: str,
              manifest_sha256: str, lease_s: float) -> tuple[Claim, Claim | None]:
        """Take the stage; return the new claim and the one it pre-empted (if another run's)."""
        if not 0 < lease_s <= MAX_LEASE_S:
            raise LayerlineError(f"lease must be above 0 and at most {MAX_LEASE_S:.0f} s, got {lease_s} s")
        with self._lock:
            holder = self._live_holder()
            if holder is not None and not self._may_take(holder, coordinator_id, term):
                same = holder.coordinator_id == coordinator_id
                raise ClaimRejected(
                    RejectReason.STALE_TERM if same or term <= holder.term
                    else RejectReason.CLAIMED_BY_OTHER,
                    f"stage is claimed by {holder.coordinator_id} at term {holder.term}; "
                    f"{coordinator_id} asked with term {term}",
                    holder,
                )
            claim = Claim(coordinator_id, term, run_id, package_ref, manifest_sha256, lease_s,
                          self._clock() + lease_s)
            self._holder = claim
            preempted = holder if holder is not None and holder.run_id != run_id else None
            return claim, preempted

    @staticmethod
    def _may_take(holder: Claim, coordinator_id: str, term: int) -> bool:
        if term > holder.term:
            return True  # a higher term pre-empts, whoever holds the stage
        return holder.coordinator_id == coordinator_id and term == holder.term

    def check(self, coordinator_id: str, term: int) -> Claim:
        """The live claim if (coordinator_id, term) holds it, its lease renewed; else reject."""
        with self._lock:
            holder = self._live_holder()
            if holder is None:
                raise ClaimRejected(RejectReason.NOT_CLAIMED,
                                    "stage is not claimed (or its lease lapsed); send Claim first",
                                    None)
            if holder.coordinator_id != coordinator_id or holder.term != term:
                raise ClaimRejected(
                    RejectReason.STALE_TERM if term < holder.term else RejectReason.CLAIMED_BY_OTHER,
                    f"stage is claimed by {holder.coordinator_id} at term {holder.term}, "
                    f"not by {coordinator_id} at term {term}",
                    holder,
                )
            return self._renew(holder)

    @contextmanager
    def answering(self, coordinator_id: str, term: int) -> Iterator[Claim]:
        """Check the caller holds the claim (see `check`), and hold the lease while it is answered.

        On leaving, the lease is renewed from that moment if the caller still holds it.
        """
        claim = self.check(coordinator_id, term)
        key = (coordinator_id, term)
        with self._lock:
            self._answering[key] += 1
        try:
            yield claim
        finally:
            with self._lock:
                self._answering[key] -= 1
                if not self._answering[key]:
                    del self._answering[key]
                holder = self._holder
                if holder is not None and (holder.coordinator_id, holder.term) == key:
                    self._renew(holder)

    def _renew(self, holder: Claim) -> Claim:
        """`holder`'s lease counted again from now (the table's lock held)."""
        self._holder = replace(holder, expires_at=self._clock() + holder.lease_s)
        return self._holder

    def release(self, coordinator_id: str, term: int) -> Claim:
        """Drop the claim held by (coordinator_id, term)."""
        claim = self.check(coordinator_id, term)
        with self._lock:
            self._holder = None
        return claim
