"""What speculation verifies drafts with: one session of the target model, position-addressed.

`forward(tokens, start_pos)` runs `tokens` at absolute positions `start_pos…` and returns
their logits (L, vocab), first forgetting every cached position >= `start_pos`, exactly as
a split pipeline's stages do with a frame (so rolling back rejected drafts costs nothing).
`rewind(position)` forgets positions >= `position` now; where the next forward would do it
anyway (the split pipeline) it may do nothing.

- `LocalTarget`: a whole model in this process (`LocalPipeline`) and one session's caches.
- `PipelineTarget`: stage 0's `PipelineSession` over the split pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import mlx.core as mx

from layerline.errors import ContextLengthError, SessionError

from .generate import LogitsModel
from .kv_cache import RangeCache

if TYPE_CHECKING:
    from .local_pipeline import LocalPipeline
    from .pipeline import PipelineSession


class Target(Protocol):
    vocab_size: int  # rows of the output head: token ids the target can embed and score

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` placed at absolute positions start_pos.."""
        ...

    def rewind(self, position: int) -> None:
        """Forget every position >= `position` (the next forward starts there or before)."""
        ...


class LocalTarget:
    """A model in this process and the caches of one session, addressed by position."""

    def __init__(self, model: LogitsModel, caches: list[RangeCache], *, vocab_size: int,
                 context_length: int | None = None) -> None:
        self.model = model
        self.caches = caches
        self.vocab_size = vocab_size
        self.context_length = context_length

    @classmethod
    def open(cls, pipeline: LocalPipeline, max_kv_size: int | None = None) -> LocalTarget:
        """A fresh session of a whole package loaded in this process."""
        return cls(pipeline, pipeline.make_cache(max_kv_size), vocab_size=pipeline.stage0.vocab_size,
                   context_length=pipeline.context_length)

    @property
    def length(self) -> int:
        """Positions the session's caches hold."""
        return self.caches[0].length if self.caches else 0

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` at positions start_pos.., after truncating there."""
        if start_pos > self.length:
            raise SessionError(
                f"this session holds {self.length} positions; tokens at {start_pos} would leave a gap",
                hint=f"feed positions {self.length}..{start_pos - 1} first")
        end = start_pos + len(tokens)
        if self.context_length is not None and end > self.context_length:
            raise ContextLengthError(
                f"positions up to {end} are past the context length {self.context_length}",
                hint="stop generating at the context length")
        self.rewind(start_pos)
        logits = self.model(mx.array([tokens], dtype=mx.uint32), self.caches)[0]
        mx.eval(logits)
        return logits

    def rewind(self, position: int) -> None:
        """Truncate every range's cache to `position` (nothing happens if it holds less)."""
        for cache in self.caches:
            if cache.length > position:
                cache.truncate(position)


class PipelineTarget:
    """Stage 0's session over the split pipeline: stages truncate at each frame's start_pos."""

    def __init__(self, session: PipelineSession) -> None:
        self.session = session
        self.vocab_size = session.pipeline.stage0.vocab_size

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) from the whole pipeline, one frame of `tokens` at `start_pos`."""
        return self.session.forward(tokens, start_pos)

    def rewind(self, position: int) -> None:
        """Nothing to send: the next frame's start_pos truncates every stage's cache."""
