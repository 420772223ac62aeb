"""A draft model whose steps run in batch passes with the other requests' (stage 0 serving).

`ModelDrafter` runs its own forward per draft token. Serving many requests, each one's
draft steps go instead to a scheduler over the draft model (`stage0/scheduler.py`, stage 0
with no peers): the k-th draft step of every request drafting at the moment runs in one
forward pass, as the target's steps do. The caches live in the scheduler, addressed by
position, so forgetting rejected drafts is the next pass's start_pos, as on the stages.

A tree (`propose_tree`, EAGLE-2's as `ModelDrafter` grows it) submits each depth's frontier
as a tree of rows (`submit_tree`), so the frontiers of every request drafting a tree at the
moment share the draft's passes too; the next forward's start_pos forgets the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import mlx.core as mx

from layerline.errors import LayerlineError

from ..model.tree import Tree
from .draft_tree import DraftTree, TreeShape
from .drafters import common_prefix, draw, grow_tree
from .sampling import SamplingParams
from .targets import PREFILL_STEP, PendingPass
from .token_distribution import recent_tokens, request_key


class DraftSession(Protocol):
    """One request's session of the draft model's scheduler (a `stage0.scheduler.BatchSession`)."""

    def forward(self, tokens: list[int], start_pos: int) -> mx.array: ...

    def submit_tree(self, tokens: list[int], parents: list[int], start_pos: int) -> PendingPass: ...


class ScheduledDrafter:
    """Drafts like `ModelDrafter` (same rule, same q), its forwards batched with other requests'."""

    def __init__(self, session: DraftSession, vocab_size: int, params: SamplingParams, *,
                 context_length: int | None = None, prefill_step: int = PREFILL_STEP,
                 supports_trees: bool = False) -> None:
        self.session = session
        self.supports_trees = supports_trees  # the draft's layers can run a tree of rows
        self.vocab_size = vocab_size
        self.params = params
        self.context_length = context_length
        self.prefill_step = prefill_step
        self.fed: list[int] = []  # the tokens the draft's caches hold
        self.replayed = 0  # positions the last proposal caught up on (Drafter.replayed)
        self._key = request_key(params.seed, stream=1)

    def sync(self, committed: list[int]) -> None:
        """Forget what is not a prefix of `committed` (the next forward's start_pos drops it there)."""
        del self.fed[common_prefix(self.fed, committed):]

    def propose(self, committed: list[int], k: int, *,
                until: Callable[[], bool] | None = None) -> tuple[list[int], mx.array | None]:
        """Up to k drafts after `committed` (fewer, but at least 2, once `until()` is true)."""
        if self.context_length is not None:
            k = min(k, self.context_length - len(committed) + 1)
        if k <= 0 or not committed:
            return [], None
        # The last committed token is always fed again: its logits give the first draft.
        keep = min(common_prefix(self.fed, committed), len(committed) - 1)
        logits = self._replay(committed, keep)
        self.fed = list(committed)
        history = recent_tokens(committed, self.params)
        tokens: list[int] = []
        dists: list[mx.array] = []
        for i in range(k):
            token, q, self._key = draw(logits, history, self.params, self._key)
            tokens.append(int(token.item()))
            if q is not None:
                dists.append(q)
            if until is not None and i >= 1 and until():
                break
            if i + 1 < k:
                if self.params.repetition_penalty != 1.0:
                    history = recent_tokens(mx.concatenate([history, token]), self.params)
                logits = self.session.forward([tokens[-1]], len(committed) + i)[-1:]
        self.fed.extend(tokens[:-1])
        return tokens, mx.concatenate(dists) if dists else None

    def propose_tree(self, committed: list[int], shape: TreeShape) -> DraftTree:
        """EAGLE-2's dynamic tree after `committed` (`drafters.grow_tree`, the rule
        `ModelDrafter.propose_tree` follows), each depth's frontier one batched tree pass of the
        draft; width 1, or a draft that cannot run trees, is `propose`'s chain."""
        depth = shape.depth
        if self.context_length is not None:
            depth = min(depth, self.context_length - len(committed) + 1)
        if depth <= 0 or not committed:
            return DraftTree.root_only(committed[-1])
        if shape.width == 1 or not self.supports_trees:
            drafts, q = self.propose(committed, depth)
            return DraftTree.chain(committed[-1], drafts, q)
        keep = min(common_prefix(self.fed, committed), len(committed) - 1)
        logits = self._replay(committed, keep)
        self.fed = list(committed)  # the tree's nodes past it are forgotten by the next start_pos

        def frontier(tokens: list[int], tree: Tree) -> mx.array:
            return self.session.submit_tree(tokens, list(tree.parents), tree.base).result()

        tree, _, self._key = grow_tree(logits, committed, TreeShape(depth, shape.width, shape.budget),
                                       self.params, self._key, self.vocab_size, frontier)
        return tree

    def _replay(self, committed: list[int], keep: int) -> mx.array:
        """Feed committed[keep:] in chunks; the logits (1, vocab) after the last one."""
        self.replayed = len(committed) - keep
        try:
            return self._feed(committed, keep)
        except LayerlineError:
            # A sliding-window cache cannot roll back that far: the draft starts over from 0.
            self.replayed = len(committed)
            return self._feed(committed, 0)

    def _feed(self, committed: list[int], start: int) -> mx.array:
        # An id past the draft's vocabulary (the target's may be larger) cannot be embedded.
        tokens = [t if t < self.vocab_size else 0 for t in committed[start:]]
        logits = None
        for offset in range(0, len(tokens), self.prefill_step):
            logits = self.session.forward(tokens[offset:offset + self.prefill_step], start + offset)
        assert logits is not None
        return logits[-1:]
