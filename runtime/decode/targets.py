"""What the decode loop runs tokens through: one session of the target model, position-addressed.

`forward(tokens, start_pos)` runs `tokens` at absolute positions `start_pos…` and returns
their logits (L, vocab), first forgetting every cached position >= `start_pos`, exactly as
a split pipeline's stages do with a frame (so rolling back rejected drafts costs nothing).
`rewind(position)` forgets positions >= `position` now; where the next forward would do it
anyway (the split pipeline) it may do nothing. `submit(tokens, start_pos)` starts the same
pass and returns at once: the split pipeline runs stage 0's layers and sends the frame, so
stage 0 can draft while the other stages verify, and read the logits afterwards.

`submit_tree(tokens, parents, start_pos)` verifies a tree of guesses in one pass (`model/tree.py`:
node 0 at `start_pos`, each node after its parent); row i of its logits follows node i's
root-to-node path. `keep_path(start_pos, path)` then keeps one path's positions and forgets
the other nodes, as if that path alone had been fed. `supports_trees` says whether the
target can.

`forward_lazy(token, start_pos)` gives one token's logits; where the target is `lazy` they are
not evaluated yet, so the plain loop queues the next step before it reads this one.
`last_trace` says where the last pass's time went, for targets that measure it.

- `LocalTarget`: a whole model in this process (`LocalPipeline`) and one session's caches;
  lazy, no trace.
- `stage0.target.PipelineTarget`: stage 0's session over the split pipeline, in the scheduler's
  batch passes; not lazy, traced on every stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import mlx.core as mx

from layerline.errors import ContextLengthError, SessionError

from ..model.kv_cache import RangeCache
from ..model.tree import Tree, check_tree

if TYPE_CHECKING:
    from .local_pipeline import LocalPipeline


PREFILL_STEP = 512  # positions per call while a model catches up on a prompt (target or draft)


class LogitsModel(Protocol):
    """A whole model in this process: token ids (B, L) and per-range caches -> logits (B, L, vocab)."""

    supports_trees: bool  # `forward_tree` can run a tree of rows

    def __call__(self, tokens: mx.array, caches: list[RangeCache], logits_from: int = 0) -> mx.array:
        """Token ids (B, L) -> logits (B, L - logits_from, vocab) of the rows from `logits_from`."""
        ...

    def forward_tree(self, tokens: mx.array, caches: list[RangeCache], tree: Tree) -> mx.array:
        """Token ids (1, L), the tree's last L nodes -> logits (1, L, vocab)."""
        ...


class PendingPass(Protocol):
    """A target pass under way: its logits when they are read, or given up."""

    def result(self) -> mx.array:
        """Logits (L, vocab) of the pass (waits for them)."""
        ...

    def discard(self) -> None:
        """Give the pass up: its logits will not be read."""
        ...

    def ready(self) -> bool:
        """Whether `result()` would return without waiting on other machines."""
        ...


class PassTiming(Protocol):
    """Where one target pass's time went, in seconds (stage0.pipeline.PassTrace is one)."""

    local_s: float  # stage 0: embedding and its own layers
    head_s: float  # stage 0: final norm and output head
    stage_compute_s: dict[int, float]  # stage index -> its layers
    hops_s: list[float]  # the link from stage i to stage i+1, both ways
    total_s: float
    queue_s: float  # stage 0: waiting for the batch pass to start and hand the logits over


class Target(Protocol):
    vocab_size: int  # rows of the output head: token ids the target can embed and score
    lazy: bool  # `forward_lazy` leaves its logits unevaluated: the plain loop may queue a step ahead
    supports_trees: bool  # `submit_tree` and `keep_path` work

    @property
    def last_trace(self) -> PassTiming | None:
        """Where the last pass's time went (None: the target does not measure it)."""
        ...

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` placed at absolute positions start_pos.."""
        ...

    def submit(self, tokens: list[int], start_pos: int, logits_from: int = 0) -> PendingPass:
        """Start `forward(tokens, start_pos)`; the caller may work meanwhile, then read `result()`,
        the logits of the rows from `logits_from` (a prompt's tail riding with a step reads none).

        Passes may be submitted before earlier ones are read (run-ahead); each submit
        truncates at its start_pos first, as `forward` does.
        """
        ...

    def submit_tree(self, tokens: list[int], parents: list[int], start_pos: int) -> PendingPass:
        """Start a pass over a tree of tokens (`parents[i]` < i, -1 for the root) from `start_pos`,
        after truncating there; row i of its logits follows node i's root-to-node path."""
        ...

    def keep_path(self, start_pos: int, path: list[int]) -> None:
        """After a tree pass at `start_pos`, keep the nodes of `path` (root first) at start_pos..;
        the session then holds start_pos + len(path) positions."""
        ...

    def forward_lazy(self, token: mx.array, start_pos: int) -> mx.array:
        """Logits (1, vocab) of one token (an mlx array) at `start_pos`, not yet evaluated where
        the target is `lazy`; the session must hold exactly `start_pos` positions."""
        ...

    def rewind(self, position: int) -> None:
        """Forget every position >= `position` (the next forward starts there or before)."""
        ...


class LocalTarget:
    """A model in this process and the caches of one session, addressed by position."""

    lazy = True  # runs a token lazily (`forward_lazy`)
    last_trace: PassTiming | None = None  # one process: nothing to break down

    def __init__(self, model: LogitsModel, caches: list[RangeCache], *, vocab_size: int,
                 context_length: int | None = None) -> None:
        self.model = model
        self.caches = caches
        self.vocab_size = vocab_size
        self.context_length = context_length

    @classmethod
    def open(cls, pipeline: LocalPipeline) -> LocalTarget:
        """A fresh session of a whole package loaded in this process."""
        return cls(pipeline, pipeline.make_cache(), vocab_size=pipeline.head.vocab_size,
                   context_length=pipeline.context_length)

    @property
    def length(self) -> int:
        """Positions the session's caches hold."""
        return self.caches[0].length if self.caches else 0

    @property
    def supports_trees(self) -> bool:
        return self.model.supports_trees

    def _check_pass(self, start_pos: int, end: int) -> None:
        """Refuse a pass that would leave a gap or reach position `end` past the context."""
        if start_pos > self.length:
            raise SessionError(
                f"this session holds {self.length} positions; tokens at {start_pos} would leave a gap",
                hint=f"feed positions {self.length}..{start_pos - 1} first")
        if self.context_length is not None and end > self.context_length:
            raise ContextLengthError(
                f"positions up to {end} are past the context length {self.context_length}",
                hint="stop generating at the context length")

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` at positions start_pos.., after truncating there."""
        self._check_pass(start_pos, start_pos + len(tokens))
        self.rewind(start_pos)
        logits = self.model(mx.array([tokens], dtype=mx.uint32), self.caches)[0]
        mx.eval(logits)
        return logits

    def submit(self, tokens: list[int], start_pos: int, logits_from: int = 0) -> PendingPass:
        """The pass's graph, queued for evaluation; its logits (rows from `logits_from`: the head
        runs on those only) are read by `result()`."""
        self._check_pass(start_pos, start_pos)
        self.rewind(start_pos)
        logits = self.model(mx.array([tokens], dtype=mx.uint32), self.caches, logits_from)[0]
        mx.async_eval(logits)
        return _QueuedPass(logits)

    def submit_tree(self, tokens: list[int], parents: list[int], start_pos: int) -> PendingPass:
        """A tree pass's graph (`model/tree.py`), queued for evaluation."""
        if len(parents) != len(tokens):
            raise SessionError(f"a tree of {len(tokens)} tokens needs as many parents, not {len(parents)}",
                               hint="give each node's parent, -1 for the root")
        depths = check_tree(parents, base=start_pos)
        self._check_pass(start_pos, start_pos + max(depths) + 1)
        self.rewind(start_pos)
        tree = Tree(start_pos, tuple(parents))
        logits = self.model.forward_tree(mx.array([tokens], dtype=mx.uint32), self.caches, tree)[0]
        mx.async_eval(logits)
        return _QueuedPass(logits)

    def keep_path(self, start_pos: int, path: list[int]) -> None:
        """Keep the tree pass's nodes `path` at start_pos.. in every range's cache."""
        for cache in self.caches:
            cache.keep_path(start_pos, path)

    def forward_lazy(self, token: mx.array, start_pos: int) -> mx.array:
        """Logits (1, vocab) of one token (an mlx array) at `start_pos`, not yet evaluated.

        The caches must hold exactly `start_pos` positions: the plain loop queues the next
        step before it reads this one.
        """
        return self.model(token.reshape(1, 1).astype(mx.uint32), self.caches)[0]

    def rewind(self, position: int) -> None:
        """Truncate every range's cache to `position` (nothing happens if it holds less)."""
        for cache in self.caches:
            if cache.length > position:
                cache.truncate(position)


class _QueuedPass:
    """A pass of a target in this process: its logits, queued for evaluation."""

    def __init__(self, logits: mx.array) -> None:
        self.logits = logits

    def result(self) -> mx.array:
        mx.eval(self.logits)
        return self.logits

    def discard(self) -> None:
        pass  # the next pass's start_pos truncates its positions

    def ready(self) -> bool:
        return False  # the same processor computes it: drafting meanwhile never waits for it
