"""Each request's speculation plan: its drafter and window policy, from the settings served.

Each request takes one `SpeculationPlan` when it starts and keeps it to the end, so replacing
the draft (`ServedSpeculation.replace`, `clear`) switches between requests, never inside one.

Concurrency rule: every request speculates on its own, with its own draft caches, held by a
scheduler over the draft model (one per loaded draft) that runs the draft steps of every
request drafting at the moment in one forward pass; it computes under stage 0's compute
lock, which serializes the draft model with the target's local layers.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from ...decode.drafters import Drafter, NgramDrafter, NoDrafter
from ...decode.sampling import SamplingParams
from ...decode.scheduled_drafter import ScheduledDrafter
from ...decode.targets import PREFILL_STEP
from ...decode.window_cost import SpeculationCosts
from ...decode.window_policy import FixedWindow, NoDrafting, WindowPolicy, policy_for
from ..scheduler import BatchScheduler, BatchSession
from .draft_loader import DraftLoader
from .served import ServedSpeculation
from .settings import SpeculationSettings

DRAFT_SESSIONS = 256  # draft sessions a draft's scheduler keeps (one per request speculating)


class RequestSpeculation(Protocol):
    """What a request asks of speculation (the HTTP body's `speculative` field)."""

    enabled: bool | None  # None: as the server decides
    window: int | None  # a fixed draft window for this request


@dataclass(frozen=True)
class SpeculationPlan:
    """How one request decodes: a drafter and window policy, or plain decoding and why."""

    drafter: Drafter
    policy: WindowPolicy
    strategy: str | None  # the strategy it speculates with; None when plain
    reason: str | None = None  # why the request decodes plainly
    overlap: bool = False  # draft each next window while the stages verify
    run_ahead: bool = False  # send it before the verdict
    close: Callable[[], None] | None = None  # when the request ends: frees its draft session

    @property
    def speculating(self) -> bool:
        return self.strategy is not None


class SpeculationPlanner:
    """Stage 0's speculation: the settings served (`served`), what drafting and target passes
    cost here (`costs`, which the auto window decides by), and each request's plan."""

    def __init__(self, settings: SpeculationSettings, *, target_fingerprint: str,
                 cache_dir: Path, weights: str) -> None:
        self.served = ServedSpeculation(settings, target_fingerprint=target_fingerprint,
                                        cache_dir=cache_dir, weights=weights)
        self.costs = SpeculationCosts()
        self._lock = threading.Lock()
        self._schedulers: dict[DraftLoader, BatchScheduler] = {}  # per loaded draft: its batch passes

    def start(self) -> SpeculationPlanner:
        """Begin loading the draft the settings name (in the background)."""
        self.served.start()
        return self

    def plan(self, override: RequestSpeculation | None, params: SamplingParams, *,
             context_length: int, lock: threading.Lock) -> SpeculationPlan:
        """The drafter and window policy of one request, from the settings and its override."""
        served = self.served.now()
        settings, loader = served.settings, served.loader
        if override is not None and override.enabled is False:
            return _plain("disabled by the request")
        reason = served.inactive_reason()
        if reason is not None:
            if override is not None and override.enabled:
                reason = f"the request asked for speculation, but {reason}"
            return _plain(reason)
        if override is not None and override.window is not None:
            policy: WindowPolicy = FixedWindow(override.window)
        else:
            policy = policy_for(settings.window_spec, costs=self.costs, overlap=settings.overlap)
        strategy = settings.strategy or settings.type
        if settings.type == "ngram":
            return SpeculationPlan(NgramDrafter(), policy, strategy, overlap=settings.overlap,
                                   run_ahead=settings.run_ahead)
        assert loader is not None and loader.model is not None
        session = self._scheduler(loader, lock, context_length).open(f"d-{uuid.uuid4().hex[:16]}")
        drafter = ScheduledDrafter(session, loader.model.head.vocab_size, params,
                                   context_length=context_length)
        return SpeculationPlan(drafter, policy, strategy, overlap=settings.overlap,
                               run_ahead=settings.run_ahead, close=lambda: self._release(loader, session))

    def _scheduler(self, loader: DraftLoader, lock: threading.Lock, context_length: int) -> BatchScheduler:
        """The scheduler of a loaded draft's passes (made at its first request)."""
        with self._lock:
            scheduler = self._schedulers.get(loader)
            if scheduler is None:
                model = loader.model
                (layers,) = model.ranges
                scheduler = BatchScheduler.local(
                    model.head, layers, context_length=context_length,
                    compute_dtype=getattr(mx, model.plan.compute_dtype), max_sessions=DRAFT_SESSIONS,
                    max_rows=PREFILL_STEP, lock=lock)
                self._schedulers[loader] = scheduler
            return scheduler

    def _release(self, loader: DraftLoader, session: BatchSession) -> None:
        """A request ended: its draft session goes; a replaced draft's scheduler goes with its last."""
        session.close()
        with self._lock:
            scheduler = self._schedulers.get(loader)
            retired = not self.served.is_current(loader) and scheduler is not None and scheduler.sessions == 0
            if retired:
                del self._schedulers[loader]
        if retired:
            scheduler.close()

    def to_json(self) -> dict[str, Any]:
        """The settings with their sources, the draft's state, whether speculation is active, the costs."""
        return {**self.served.to_json(), "costs": self.costs.to_json()}


def _plain(reason: str) -> SpeculationPlan:
    return SpeculationPlan(NoDrafter(), NoDrafting(), None, reason)
