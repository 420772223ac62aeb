"""What stage 0's lanes and its coordinator share while a lost stage is replaced.

The coordinator replaces the stage (claim a spare, prepare and load the range, relink the
stage before it) and then bumps `generation`; each lane, seeing a generation newer than its
link's, reconnects and replays every live session's tokens so far before its next pass, and
a pass that failed on the lost stage runs again. Until then the lanes wait: the requests see
a pause. Past the deadline with no replacement the pipeline is degraded and the waiting
passes fail with a clear error (the coordinator keeps looking; a later repair serves again).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from layerline.errors import StageUnavailableError

DEFAULT_FAILOVER_S = 30.0  # how long a lost stage may take to be replaced


@dataclass
class Pause:
    """One stage's loss and its repair, in seconds from its detection."""

    stage: int
    layers: tuple[int, int]
    lost: str  # the lost peer's control endpoint
    detected_unix: float = field(default_factory=time.time)
    detected: float = field(default_factory=time.monotonic)
    replacement: str | None = None
    claimed_s: float | None = None
    loaded_s: float | None = None  # the range loaded and the stage before relinked
    replayed_s: float | None = None  # the last lane's sessions replayed (at its first pass after)
    replayed_sessions: int = 0
    tried: dict[str, str] = field(default_factory=dict)  # endpoint -> why it could not replace the stage
    state: str = "recovering"  # recovering | repaired | degraded

    def since(self) -> float:
        return round(time.monotonic() - self.detected, 3)

    def to_json(self) -> dict:
        return {"stage": self.stage, "layers": list(self.layers), "lost": self.lost,
                "replacement": self.replacement, "state": self.state, "detected_unix": self.detected_unix,
                "claimed_s": self.claimed_s, "loaded_s": self.loaded_s, "replayed_s": self.replayed_s,
                "replayed_sessions": self.replayed_sessions,
                "tried": [f"{endpoint}: {why}" for endpoint, why in self.tried.items()]}


class Failover:
    """The pipeline's repair state: how many times it was relinked, and the pauses so far."""

    KEPT_PAUSES = 16

    def __init__(self, failover_s: float, first_peer: str | None = None) -> None:
        self.failover_s = failover_s  # how long a lost stage may take to be replaced
        self._cond = threading.Condition()
        self.generation = 0  # bumped at each repair: the lanes' links older than it are stale
        self.first_peer = first_peer  # stage 1's control endpoint, as of `generation`
        self.error = ""  # why the pipeline is degraded ("" when it is not)
        self.pauses: list[Pause] = []

    @property
    def state(self) -> str:
        """ok, recovering (a stage is being replaced) or degraded (no replacement in time)."""
        with self._cond:
            if self.error:
                return "degraded"
            return "recovering" if any(p.state == "recovering" for p in self.pauses) else "ok"

    def begin(self, stage: int, layers: tuple[int, int], lost: str) -> Pause:
        """A stage was lost: its pause starts now."""
        pause = Pause(stage, layers, lost)
        with self._cond:
            self.pauses = [*self.pauses[-(self.KEPT_PAUSES - 1):], pause]
        return pause

    def repaired(self, pause: Pause, first_peer: str | None) -> None:
        """The stage is back (replaced or relinked): the lanes replay and go on."""
        with self._cond:
            pause.state = "repaired"
            self.first_peer = first_peer
            self.error = ""
            self.generation += 1
            self._cond.notify_all()

    def degrade(self, pause: Pause, error: str) -> None:
        """No replacement in time: the passes waiting for one fail with `error`."""
        with self._cond:
            pause.state = "degraded"
            self.error = error
            self._cond.notify_all()

    def wait(self, seen: int) -> int:
        """Wait for a repair newer than generation `seen`; its generation. Raises once degraded."""
        # The coordinator degrades the pipeline after failover_s; this deadline only guards
        # against a repair that never reports either way.
        limit_s = 2 * self.failover_s + 10
        deadline = time.monotonic() + limit_s
        with self._cond:
            while self.generation <= seen:
                error = self.error or (f"no repair of the pipeline reported within {limit_s:.0f} s"
                                       if time.monotonic() > deadline else "")
                if error:
                    raise StageUnavailableError(error, hint="start a spare stage (`layerline stage serve`) "
                                                "and name it with --spare, then send the request again")
                self._cond.wait(min(1.0, max(0.01, deadline - time.monotonic())))
            return self.generation

    def replayed(self, sessions: int) -> None:
        """A lane replayed `sessions` sessions (at least one) after the latest repair."""
        with self._cond:
            pause = next((p for p in reversed(self.pauses) if p.state == "repaired"), None)
            if pause is not None:
                pause.replayed_s = pause.since()
                pause.replayed_sessions += sessions

    def to_json(self) -> dict:
        state = self.state
        with self._cond:
            return {"state": state, "error": self.error or None, "generation": self.generation,
                    "pauses": [p.to_json() for p in self.pauses]}
