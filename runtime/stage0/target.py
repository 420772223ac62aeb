"""Stage 0's target: one request's session over the split pipeline, as the decode loop sees it."""

from __future__ import annotations

import mlx.core as mx

from ..decode.targets import PendingPass
from .pipeline import PassTrace
from .scheduler import BatchSession


class PipelineTarget:
    """Stage 0's session over the split pipeline, its passes run in the scheduler's batch passes:
    stages truncate at each pass's start_pos, and compact a tree to its accepted path with the
    session's next frame."""

    def __init__(self, session: BatchSession) -> None:
        self.session = session
        self.vocab_size = session.pipeline.head.vocab_size

    # Not lazy: stage 0 serves requests from several threads and evaluates under its compute
    # lock, which a step queued ahead (evaluated whenever it is read) would escape.
    lazy = False

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) from the whole pipeline, one frame of `tokens` at `start_pos`."""
        return self.session.forward(tokens, start_pos)

    def submit(self, tokens: list[int], start_pos: int, logits_from: int = 0) -> PendingPass:
        """Stage 0's layers now, the other stages meanwhile: read the logits of the rows from
        `logits_from` with `result()`."""
        return self.session.submit(tokens, start_pos, logits_from)

    @property
    def supports_trees(self) -> bool:
        """Whether every stage can run a tree of drafts (they all run this package's architecture)."""
        return self.session.pipeline.supports_trees

    def submit_tree(self, tokens: list[int], parents: list[int], start_pos: int) -> PendingPass:
        """A tree of `tokens` (one parent each, -1 for the root) from `start_pos` in one pass through
        every stage, truncated at start_pos first: logits row i after node i's path."""
        return self.session.submit_tree(tokens, parents, start_pos)

    def keep_path(self, start_pos: int, path: list[int]) -> None:
        """Keep only the accepted `path` of the tree at `start_pos`: every stage compacts its caches
        with the session's next frame, which then starts from start_pos + len(path)."""
        self.session.keep_path(start_pos, path)

    def forward_lazy(self, token: mx.array, start_pos: int) -> mx.array:
        """Logits (1, vocab) of one token (an mlx array) at `start_pos`, computed now (not lazy)."""
        return self.forward([int(token.item())], start_pos)

    @property
    def last_trace(self) -> PassTrace | None:
        """Where the last pass's time went on every stage."""
        return self.session.last_trace

    def rewind(self, position: int) -> None:
        """Nothing to send: the next frame's start_pos truncates every stage's cache."""
