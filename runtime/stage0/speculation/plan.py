"""Each request's speculation plan: its drafter and window policy, from the settings served.

Each request takes one `SpeculationPlan` when it starts and keeps it to the end, so replacing
the draft (`ServedSpeculation.replace`, `clear`) switches between requests, never inside one.

Concurrency rule: every request speculates on its own, with its own draft caches, held by a
scheduler over the draft model (one per loaded draft) that runs the draft steps of every
request drafting at the moment in one forward pass; it computes under stage 0's compute
lock, which serializes the draft model with the target's local layers.

Token trees (the `tree` setting: "off", "auto" or a shape "D,W[,N]"): a request verifies a
drafted tree per step when every stage's layers can run one (`serve_target`) and its drafter
can grow one (the n-gram drafter always; a draft model whose layers run trees); else it drafts
chains, and `/v1/status` says why under `speculative.tree`. A tree does not overlap with the
pass: a request that drafts trees runs with overlap and run-ahead off (logged once).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from layerline.packager.manifest import Calibration

from ...decode.draft_tree import TreeShape
from ...decode.drafters import Drafter, NgramDrafter, NoDrafter
from ...decode.sampling import SamplingParams
from ...decode.scheduled_drafter import ScheduledDrafter
from ...decode.targets import PREFILL_STEP
from ...decode.tree_policy import AutoTree, FixedTree, Load, TreePolicy
from ...decode.window_cost import SpeculationCosts, TreeAcceptance
from ...decode.window_policy import FixedWindow, NoDrafting, WindowPolicy, policy_for
from ..scheduler import BatchScheduler, BatchSession
from .draft_loader import DraftLoader
from .served import ServedSpeculation
from .settings import SpeculationSettings

log = logging.getLogger("layerline.speculative")

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
    tree: TreePolicy | None = None  # each drafting step verifies a tree of the shape it picks
    tree_reason: str | None = None  # why a request with trees configured drafts chains

    @property
    def speculating(self) -> bool:
        return self.strategy is not None


class SpeculationPlanner:
    """Stage 0's speculation: the settings served (`served`), what drafting and target passes
    cost here (`costs`, which the auto window decides by), and each request's plan."""

    def __init__(self, settings: SpeculationSettings, *, target_fingerprint: str,
                 cache_dir: Path, weights: str, calibrations: dict[str, Calibration] | None = None) -> None:
        self.served = ServedSpeculation(settings, target_fingerprint=target_fingerprint,
                                        cache_dir=cache_dir, weights=weights)
        self.costs = SpeculationCosts()
        self.calibrations = calibrations or {}  # per package strategy: what the auto tree starts from
        self.target_trees: bool | None = None  # whether the stages run trees (None: not loaded yet)
        self._told_overlap = False
        self._lock = threading.Lock()
        self._schedulers: dict[DraftLoader, BatchScheduler] = {}  # per loaded draft: its batch passes

    def start(self) -> SpeculationPlanner:
        """Begin loading the draft the settings name (in the background)."""
        self.served.start()
        return self

    def serve_target(self, *, supports_trees: bool) -> None:
        """The pipeline is up: whether its stages can verify trees."""
        self.target_trees = supports_trees

    def plan(self, override: RequestSpeculation | None, params: SamplingParams, *,
             context_length: int, lock: threading.Lock, load: Load | None = None) -> SpeculationPlan:
        """The drafter, window policy and tree of one request, from the settings and its override;
        `load` is the request's batch load (sessions sharing its passes, their recent passes)."""
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
        draft_trees = settings.type == "ngram" or (loader is not None and loader.model is not None
                                                   and loader.model.supports_trees)
        reason = self.tree_reason(settings, draft_trees, override)
        tree = self._tree(settings, load) if reason is None and settings.tree != "off" else None
        overlap, run_ahead = settings.overlap, settings.run_ahead
        if tree is not None and (overlap or run_ahead):
            overlap = run_ahead = False
            if not self._told_overlap:
                self._told_overlap = True
                log.info("event=speculation tree=%s overlap=off reason=trees do not overlap with the pass",
                         settings.tree)
        if settings.type == "ngram":
            return SpeculationPlan(NgramDrafter(), policy, strategy, overlap=overlap, run_ahead=run_ahead,
                                   tree=tree, tree_reason=reason)
        assert loader is not None and loader.model is not None
        session = self._scheduler(loader, lock, context_length).open(f"d-{uuid.uuid4().hex[:16]}")
        drafter = ScheduledDrafter(session, loader.model.head.vocab_size, params,
                                   context_length=context_length, supports_trees=draft_trees)
        return SpeculationPlan(drafter, policy, strategy, overlap=overlap, run_ahead=run_ahead,
                               close=lambda: self._release(loader, session), tree=tree, tree_reason=reason)

    def tree_reason(self, settings: SpeculationSettings, draft_trees: bool,
                    override: RequestSpeculation | None = None) -> str | None:
        """Why requests draft chains though trees are configured (None: they draft trees, or
        trees are off)."""
        if settings.tree == "off":
            return None
        if self.target_trees is False:
            return ("the stages' layers cannot run a token tree (this architecture's attention or "
                    "RoPE takes one chain)")
        if not draft_trees:
            return "the draft model's layers cannot run a token tree"
        if override is not None and override.window is not None:
            return "the request fixed its draft window"
        return None

    def _tree(self, settings: SpeculationSettings, load: Load | None) -> TreePolicy:
        """The tree policy the `tree` setting names."""
        if settings.tree != "auto":
            return FixedTree(TreeShape.parse(settings.tree))
        calibration = self.calibrations.get(settings.strategy or "")
        acceptance = (TreeAcceptance(calibration.acceptance_by_depth, calibration.acceptance_top_r)
                      if calibration is not None and calibration.acceptance_by_depth else None)
        return AutoTree(self.costs, acceptance=acceptance, max_depth=settings.window_spec.max, load=load)

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
        """The settings with their sources, the draft's state, whether speculation is active, the
        costs, and whether requests draft trees (`tree`)."""
        served = self.served.now()
        settings = served.settings
        tree = None
        if settings.tree != "off":
            model = served.loader.model if served.loader is not None else None
            draft_trees = settings.type == "ngram" or (model is not None and model.supports_trees)
            reason = self.tree_reason(settings, draft_trees)
            calibrated = settings.strategy in self.calibrations
            tree = {"setting": settings.tree, "active": reason is None and served.inactive_reason() is None,
                    "chains_because": reason, "calibrated": calibrated,
                    "overlap": "off for requests that draft trees" if settings.overlap or settings.run_ahead
                    else None}
        state = {"tree_state": tree} if tree is not None else {}
        return {**self.served.to_json(), "costs": self.costs.to_json(), **state}


def _plain(reason: str) -> SpeculationPlan:
    return SpeculationPlan(NoDrafter(), NoDrafting(), None, reason)
