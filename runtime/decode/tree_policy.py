"""Which token tree a drafting step drafts: a fixed shape (`FixedTree`), or the shape that
maximises expected tokens per second from measured costs (`AutoTree`, window_cost.choose_tree).

The auto tree's inputs: V(n), the pass cost by positions the server measured (its batch
passes' by rows, while other sessions share them: then a tree's nodes are rows beside
theirs); the draft's seconds per depth (a tree is one draft call per depth); and p_d(W), the
chance that the accepted path goes on at depth d with W candidates per depth. p_d(W) starts
from the strategy's calibration (`pkg calibrate`: chain acceptance by depth, and how often the
target's token is among the draft's top r), and its misses are scaled by what this request's
tree steps saw at that depth against what the prior expected (decayed counts, a few
pseudo-positions of the prior). Width 1 is a chain; below a gain of 1 the step does not
draft, for an off period as the auto window's, after which a small probe tree measures afresh.
Each tree's acceptance per position also moves the server's mean, which new requests start from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from ..model.tree import MAX_TREE_NODES
from .draft_tree import TreeShape
from .window_cost import (
    DECAY,
    PSEUDO_COUNTS,
    SpeculationCosts,
    TreeAcceptance,
    TreeChoice,
    choose_tree,
    fit_pass_cost,
)
from .window_policy import GateSettings, OffPeriod

log = logging.getLogger("layerline.speculative")

MAX_AUTO_WIDTH = 4  # candidates per depth the auto tree considers (calibration measures ranks 1..4)
MAX_AUTO_DEPTH = 8  # and depths
AUTO_NODES = 32  # drafted nodes at most in an auto tree
INITIAL_SHAPE = TreeShape(4, 2, 8)  # until costs are measured (and for seeded sampled requests)
PROBE_SHAPE = TreeShape(2, 2, 4)  # after an off period: a small tree measures acceptance afresh

# (sessions sharing the request's passes, recent batch passes as (rows, seconds))
Load = Callable[[], tuple[int, list[tuple[int, float]]]]


class TreePolicy(Protocol):
    """The tree shape of one request's drafting steps."""

    kind: str  # "fixed" | "auto"
    last_choice: TreeChoice | None  # the auto tree's latest decision (None: fixed, or none yet)

    def next_shape(self, limit: int, *, gated: bool = True) -> TreeShape | None:
        """The next step's tree, at most `limit` deep; None: the step does not draft.
        `gated=False`: timings must not decide (a seeded sampled request)."""
        ...

    def record(self, width: int, depth: int, path: int) -> None:
        """A tree step drafted `width` per depth down to `depth`; `path` drafts of it stood."""
        ...


class FixedTree:
    """Always the same shape (shallower only where the request or context ends)."""

    kind = "fixed"
    last_choice: TreeChoice | None = None

    def __init__(self, shape: TreeShape) -> None:
        self.shape = shape

    def next_shape(self, limit: int, *, gated: bool = True) -> TreeShape | None:
        """The shape, at most `limit` deep."""
        return clipped(self.shape, limit)

    def record(self, width: int, depth: int, path: int) -> None:
        """Nothing to learn."""


class AutoTree:
    """The tree of best expected gain (the module's docstring), chosen before every drafting step."""

    kind = "auto"

    def __init__(self, costs: SpeculationCosts, *, acceptance: TreeAcceptance | None = None,
                 max_depth: int = MAX_AUTO_DEPTH, max_width: int = MAX_AUTO_WIDTH,
                 max_nodes: int = AUTO_NODES, load: Load | None = None,
                 gate: GateSettings = GateSettings()) -> None:
        self.costs = costs
        self.acceptance = acceptance  # None: the server's mean acceptance at every depth
        self.max_depth = max(1, min(max_depth, MAX_AUTO_DEPTH))
        self.max_width = max(1, max_width)
        self.max_nodes = min(max_nodes, MAX_TREE_NODES - 1)
        self.load = load
        self.last_choice: TreeChoice | None = None
        self._tried = [[0.0] * self.max_depth for _ in range(self.max_width)]
        self._stood = [[0.0] * self.max_depth for _ in range(self.max_width)]
        self._off = OffPeriod(gate)
        self._gate = gate
        self._probing = False  # the next drafting step is a probe (an off period just ended)

    def rates(self) -> list[list[float]]:
        """p_d(W) for every width and depth: the prior's misses at depth d scaled by k_d, the
        misses seen at that depth (any width) over those the prior expected there (with a few
        pseudo-positions of the prior's own rate), so what one width saw informs every width."""
        prior = self.acceptance or TreeAcceptance((self.costs.accept_prior,))
        expect = [[1 - prior.continue_rate(d + 1, w + 1) for d in range(self.max_depth)]
                  for w in range(self.max_width)]
        out = [[0.0] * self.max_depth for _ in range(self.max_width)]
        for d in range(self.max_depth):
            seen = sum(self._tried[w][d] - self._stood[w][d] for w in range(self.max_width))
            expected = sum(self._tried[w][d] * expect[w][d] for w in range(self.max_width))
            chain_miss = expect[0][d]
            scale = (seen + PSEUDO_COUNTS * chain_miss) / (expected + PSEUDO_COUNTS * chain_miss) \
                if chain_miss > 0 else 1.0
            for w in range(self.max_width):
                out[w][d] = max(0.0, 1 - expect[w][d] * scale)
        return out

    def next_shape(self, limit: int, *, gated: bool = True) -> TreeShape | None:
        """The chosen tree; the initial shape until costs are measured, or ungated."""
        if limit <= 0:
            return None
        if not gated:
            return clipped(INITIAL_SHAPE, limit)
        if self._off.active:
            self._probing = self._off.tick()
            return None
        if self._probing:
            self._probing = False
            return clipped(PROBE_SHAPE, limit)
        choice = self.choose()
        if choice is None:
            return clipped(INITIAL_SHAPE, limit)
        if choice.depth == 0:
            off = self._off.start()
            log.info("event=speculation_gate policy=auto_tree drafting=off gain=%.2f off_steps=%d",
                     choice.gain or 0.0, off)
            return None
        self._off.won()
        return clipped(TreeShape(choice.depth, choice.width, choice.nodes), limit)

    def choose(self) -> TreeChoice | None:
        """Decide now from the costs and acceptance (None until a pass and a draft were timed)."""
        draft_s = self.costs.draft_s_per_depth
        sessions, cost = 1, self.costs.pass_cost()
        if self.load is not None:
            sharing, samples = self.load()
            batch_cost = fit_pass_cost(samples) if sharing > 1 else None
            if batch_cost is not None:
                sessions, cost = sharing, batch_cost
        if cost is None or draft_s is None:
            return None
        choice = choose_tree(self.rates(), cost, draft_s, max_nodes=self.max_nodes,
                             sessions=sessions, min_gain=self._gate.min_speedup)
        self.last_choice = self.costs.last_tree_choice = choice
        return choice

    def record(self, width: int, depth: int, path: int) -> None:
        """Count, at `width`, each depth the tree reached: tried once the path reached the depth above."""
        for w in range(self.max_width):
            self._tried[w] = [t * DECAY for t in self._tried[w]]
            self._stood[w] = [s * DECAY for s in self._stood[w]]
        if depth > 0:
            self.costs.record_accept_rate(path / min(depth, path + 1))
        w = min(width, self.max_width) - 1
        for d in range(min(depth, self.max_depth, path + 1)):
            self._tried[w][d] += 1
            self._stood[w][d] += d < path


def clipped(shape: TreeShape, limit: int) -> TreeShape | None:
    """`shape`, at most `limit` deep (None when nothing may be drafted)."""
    if limit <= 0:
        return None
    depth = min(shape.depth, limit)
    return TreeShape(depth, shape.width, min(shape.budget, depth * shape.width))
