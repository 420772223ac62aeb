"""What speculation verifies drafts with: one session of the target model, position-addressed.

`forward(tokens, start_pos)` runs `tokens` at absolute positions `start_pos…` and returns
their logits (L, vocab), first forgetting every cached position >= `start_pos`, exactly as
a split pipeline's stages do with a frame (so rolling back rejected drafts costs nothing).
`rewind(position)` forgets positions >= `position` now; where the next forward would do it
anyway (the split pipeline) it may do nothing.

- `PipelineTarget`: stage 0's `PipelineSession` over the split pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import mlx.core as mx

if TYPE_CHECKING:
    from ..stage.pipeline import PipelineSession


class Target(Protocol):
    vocab_size: int  # rows of the output head: token ids the target can embed and score

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` placed at absolute positions start_pos.."""
        ...

    def rewind(self, position: int) -> None:
        """Forget every position >= `position` (the next forward starts there or before)."""
        ...


class PipelineTarget:
    """Stage 0's session over the split pipeline: stages truncate at each frame's start_pos."""

    def __init__(self, session: PipelineSession) -> None:
        self.session = session
        self.vocab_size = session.pipeline.head.vocab_size

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) from the whole pipeline, one frame of `tokens` at `start_pos`."""
        return self.session.forward(tokens, start_pos)

    def rewind(self, position: int) -> None:
        """Nothing to send: the next frame's start_pos truncates every stage's cache."""
