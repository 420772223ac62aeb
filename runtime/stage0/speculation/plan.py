"""Stage 0's speculation: the resolved settings, the draft behind them, and each request's plan.

At start the settings come from `resolve_speculative` (flag > config > package). A
`draft-model` strategy loads its draft in the background (`DraftLoader`), in parallel with
the pipeline's bring-up; an `ngram` strategy needs nothing. Until a draft is ready, or if it
fails, requests decode plainly and `to_json()` says why: the server never waits on a draft.

Each request takes one `SpeculationPlan` when it starts (its drafter and window policy) and
keeps it to the end, so replacing the draft (`replace`, `clear`) switches between requests,
never inside one. `with_draft` builds the settings of a runtime change (`PUT /v1/draft`);
such changes live in this process only: a restart resolves the settings afresh.

Concurrency rule: every request speculates on its own, with its own draft caches, held by a
scheduler over the draft model (one per loaded draft) that runs the draft steps of every
request drafting at the moment in one forward pass; it computes under stage 0's compute
lock, which serializes the draft model with the target's local layers.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from layerline.errors import LayerlineError, SourceError
from layerline.packager.source import is_hub_id
from layerline.packager.speculative import (
    NGRAM,
    local_draft_fingerprint,
    require_same_tokenizer,
    strategy_name_for,
)
from layerline.packager.window_spec import WindowSpec

from ...decode.drafters import Drafter, NgramDrafter, NoDrafter
from ...decode.sampling import SamplingParams
from ...decode.scheduled_drafter import ScheduledDrafter
from ...decode.targets import PREFILL_STEP
from ...decode.window_cost import SpeculationCosts
from ...decode.window_policy import WindowPolicy
from ..scheduler import BatchScheduler, BatchSession
from .draft_loader import DraftLoader, DraftState
from .resolve import ResolvedSpeculativeConfig

log = logging.getLogger("layerline.speculative")

SOURCE_PUT = "runtime PUT /v1/draft"
DRAFT_SESSIONS = 256  # draft sessions a draft's scheduler keeps (one per request speculating)
SOURCE_DELETE = "runtime DELETE /v1/draft"


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


class Stage0Speculation:
    """The speculation settings stage 0 serves with, and the draft model they name."""

    def __init__(self, settings: ResolvedSpeculativeConfig, *, target_fingerprint: str,
                 cache_dir: Path, weights: str) -> None:
        self.target_fingerprint = target_fingerprint
        self.cache_dir = cache_dir
        self.weights = weights
        self._lock = threading.Lock()
        self._settings = settings
        self._loader: DraftLoader | None = None
        self._pending: tuple[ResolvedSpeculativeConfig, DraftLoader] | None = None
        self._failed: DraftState | None = None  # the last replacement that failed to load
        # What drafting and target passes cost here: the auto window decides by it.
        self.costs = SpeculationCosts()
        self._schedulers: dict[DraftLoader, BatchScheduler] = {}  # per loaded draft: its batch passes

    def start(self) -> Stage0Speculation:
        """Begin loading the draft the settings name (in the background)."""
        if self._settings.enabled and self._settings.type == "draft-model":
            self._loader = self._load(self._settings)
        return self

    def _load(self, settings: ResolvedSpeculativeConfig) -> DraftLoader:
        assert settings.draft_model is not None
        return DraftLoader(settings.draft_model, self.target_fingerprint, self.cache_dir,
                           self.weights).start()

    @property
    def settings(self) -> ResolvedSpeculativeConfig:
        return self._settings

    def draft_state(self) -> DraftState:
        """none, loading, ready or failed (with the reason)."""
        loader = self._loader
        if loader is None:
            return DraftState("none")
        return loader.state

    def inactive_reason(self) -> str | None:
        """Why requests decode plainly now, or None when speculation is active."""
        settings = self._settings
        if not settings.enabled:
            return settings.reason or "speculation is off"
        if settings.type == "ngram":
            return None
        state = self.draft_state()
        if state.state == "ready":
            return None
        if state.state == "loading":
            return f"draft {settings.draft_model} is still loading"
        return f"draft {settings.draft_model} failed: {state.reason}"

    def replace(self, settings: ResolvedSpeculativeConfig) -> DraftLoader | None:
        """Serve with `settings` once their draft is ready; until then the current ones stay.

        Returns the loader of the new draft (None for settings that need no model).
        """
        if not (settings.enabled and settings.type == "draft-model"):
            with self._lock:
                self._settings, self._loader, self._pending, self._failed = settings, None, None, None
            return None
        with self._lock:
            current = self._loader
            if (current is not None and current.reference == settings.draft_model
                    and current.state.state == "ready"):
                # Same draft, other window policy: keep the loaded model, switch now.
                self._settings, self._pending, self._failed = settings, None, None
                return current
        loader = self._load(settings)
        with self._lock:
            self._pending, self._failed = (settings, loader), None
        threading.Thread(target=self._switch_when_loaded, args=(settings, loader),
                         name="draft-switch", daemon=True).start()
        return loader

    def _switch_when_loaded(self, settings: ResolvedSpeculativeConfig, loader: DraftLoader) -> None:
        state = loader.wait()
        with self._lock:
            if self._pending is None or self._pending[1] is not loader:
                return  # replaced again meanwhile
            self._pending = None
            if state.state == "ready":
                self._settings, self._loader = settings, loader
            else:
                self._failed = state  # the current settings stay; the failure stays visible
        if state.state == "ready":
            log.info("event=draft_switched reference=%s", settings.draft_model)

    def clear(self) -> None:
        """Speculation off from the next request on; the draft (loaded or loading) is dropped."""
        settings = self._settings.off("speculation turned off by DELETE /v1/draft")
        self.replace(dataclasses.replace(settings, sources={**settings.sources, "enabled": SOURCE_DELETE}))

    def with_draft(self, draft_model: str, window: Mapping[str, Any]) -> ResolvedSpeculativeConfig:
        """Settings that speculate with `draft_model` ("ngram": prompt lookup), with the window
        settings given in `window` (named as in config); those not given stay as they are.

        A local draft's tokenizer is checked here, before anything loads; a Hub draft's is
        checked once it is fetched (a mismatch then shows in `to_json()["failed_draft"]`).
        """
        current = self._settings
        spec = WindowSpec.from_json({**current.window_spec.to_json(), **window}).validate()
        changed = [*window, "enabled", "strategy", "type", "draft_model", "tokenizer_fingerprint"]
        sources = {**current.sources, **dict.fromkeys(changed, SOURCE_PUT)}
        timing = {"overlap": current.overlap, "run_ahead": current.run_ahead}
        if draft_model == NGRAM:  # prompt-lookup drafting: no model to load
            return ResolvedSpeculativeConfig(enabled=True, strategy=NGRAM, type="ngram", window_spec=spec,
                                             sources=sources, **timing)
        fingerprint = self._check_draft(draft_model)
        return ResolvedSpeculativeConfig(
            enabled=True, strategy=strategy_name_for(draft_model), type="draft-model",
            draft_model=draft_model, tokenizer_fingerprint=fingerprint, window_spec=spec, sources=sources,
            **timing)

    def _check_draft(self, reference: str) -> str | None:
        """The draft's tokenizer fingerprint when it is local (None for a Hub draft); refuses a mismatch."""
        try:
            fingerprint = local_draft_fingerprint(reference)
        except SourceError as exc:  # its detail may quote the file: say only what it is not
            raise LayerlineError(f"draft {reference} is not a layer package, GGUF file or Hugging Face "
                                 "model folder", hint="give one of those, or a Hub repo id") from exc
        if fingerprint is None:
            if not is_hub_id(reference):
                raise LayerlineError(f"draft {reference} does not exist on stage 0",
                                     hint="give a package folder, a GGUF file or a model folder on "
                                          "stage 0's machine, or a Hub repo id")
            return None
        require_same_tokenizer(reference, fingerprint, self.target_fingerprint)
        return fingerprint

    def pending(self) -> DraftState | None:
        """The state of a draft being loaded to replace the current one, if any."""
        pending = self._pending
        return pending[1].state if pending is not None else None

    def plan(self, override: RequestSpeculation | None, params: SamplingParams, *,
             context_length: int, lock: threading.Lock) -> SpeculationPlan:
        """The drafter and window policy of one request, from the settings and its override."""
        with self._lock:
            settings, loader = self._settings, self._loader
        if override is not None and override.enabled is False:
            return _plain("disabled by the request")
        reason = self.inactive_reason()
        if reason is not None:
            if override is not None and override.enabled:
                reason = f"the request asked for speculation, but {reason}"
            return _plain(reason)
        if override is not None and override.window is not None:
            policy = WindowPolicy.fixed(override.window)
        else:
            policy = WindowPolicy.for_spec(settings.window_spec, costs=self.costs, overlap=settings.overlap)
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
            retired = loader is not self._loader and scheduler is not None and scheduler.sessions == 0
            if retired:
                del self._schedulers[loader]
        if retired:
            scheduler.close()

    def to_json(self) -> dict[str, Any]:
        """The settings with their sources, the draft's state, and whether speculation is active."""
        reason = self.inactive_reason()
        pending = self.pending()
        failed = self._failed
        return {**self._settings.to_json(), "active": reason is None, "inactive_reason": reason,
                "draft": self.draft_state().to_json(),
                "pending_draft": pending.to_json() if pending is not None else None,
                "failed_draft": failed.to_json() if failed is not None else None,
                "costs": self.costs.to_json()}


def _plain(reason: str) -> SpeculationPlan:
    return SpeculationPlan(NoDrafter(), WindowPolicy.off(), None, reason)
