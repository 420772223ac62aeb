"""Stage 0's own compute in a batch pass: the embedding and its layer range before the rows go
down the pipeline, the head once they come back.

It runs under the pipeline's compute lock, which stage 0's lanes share with each other and,
on one device, with the draft model's passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from ..stage.wire import Rows
from .pipeline import Pipeline


class Forward:
    """Stage 0's embedding, layers and head over the rows of many sessions at once."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def drop(self, session_ids: Sequence[str]) -> None:
        """Forget ended sessions' caches in stage 0's own layers."""
        if self._pipeline.local is not None:
            for session_id in session_ids:
                self._pipeline.local.drop_session(session_id)

    def layers(self, rows: list[Rows], tokens: list[int]) -> mx.array:
        """Hidden states (1, N, D) of `tokens` after stage 0's layers, each session's `rows` at
        its own positions."""
        p = self._pipeline
        with p.compute_lock:
            h = p.head.embed(mx.array([tokens]))
            if p.local is not None:
                h = p.local.forward_batch(rows, h)
            else:
                mx.eval(h)
        return h

    def logits(self, hidden: mx.array, lengths: list[int]) -> list[mx.array]:
        """Logits of the last stage's hidden rows (N, D) in one call to the head, split into runs
        of `lengths` rows (one a session)."""
        p = self._pipeline
        with p.compute_lock:
            logits = p.head.logits(hidden[None])[0]
            mx.eval(logits)
        runs = []
        start = 0
        for length in lengths:
            runs.append(logits[start:start + length])
            start += length
        mx.eval(runs)
        return runs
