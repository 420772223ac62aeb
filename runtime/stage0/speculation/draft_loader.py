"""Stage 0's draft model, loaded in the background (`decode.draft_model` resolves and checks it).

Nothing here ever stops the server: a draft that cannot be had leaves the state `failed`
with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerline.errors import LayerlineError

from ...decode.draft_model import load_draft

log = logging.getLogger("layerline.draft")


@dataclass(frozen=True)
class DraftState:
    state: str  # "none" | "loading" | "ready" | "failed"
    reference: str | None = None
    reason: str | None = None
    fingerprint: str | None = None
    load_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "reference": self.reference, "reason": self.reason,
                "fingerprint": self.fingerprint, "load_seconds": self.load_seconds}


class DraftLoader:
    """Loads one draft in a background thread; `state` says how far it got."""

    def __init__(self, reference: str, target_fingerprint: str, cache_dir: Path, weights: str) -> None:
        self.reference = reference
        self.target_fingerprint = target_fingerprint
        self.cache_dir = cache_dir
        self.weights = weights
        self.model: Any = None
        self._state = DraftState("loading", reference)
        self._thread = threading.Thread(target=self._load, name="draft-loader", daemon=True)

    @property
    def state(self) -> DraftState:
        return self._state

    def start(self) -> DraftLoader:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> DraftState:
        self._thread.join(timeout)
        return self._state

    def _load(self) -> None:
        started = time.monotonic()
        try:
            self.model, fingerprint = load_draft(self.reference, self.target_fingerprint, self.cache_dir,
                                                 self.weights)
        except Exception as exc:  # any failure leaves the server serving without the draft
            reason = str(exc) if isinstance(exc, LayerlineError) else f"{type(exc).__name__}: {exc}"
            self._state = DraftState("failed", self.reference, reason=reason)
            log.warning("event=draft_failed reference=%s reason=%s", self.reference, reason)
            return
        seconds = round(time.monotonic() - started, 2)
        self._state = DraftState("ready", self.reference, fingerprint=fingerprint, load_seconds=seconds)
        log.info("event=draft_ready reference=%s seconds=%.2f", self.reference, seconds)
