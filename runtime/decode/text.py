"""A generation's tokens as text deltas, ended by an end-of-generation token, a stop string,
`max_tokens` or the context; what `layerline run` prints and stage 0 streams."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..model.tokenizer import TextStream
from .loop import Generation, Token


@dataclass(frozen=True)
class TextEvent:
    """Text that may be shown now; the last event has `finish_reason` ("stop" | "length")."""

    text: str
    token: Token | None  # the token that brought it (None: the context ended the request)
    finish_reason: str | None = None


def text_events(generation: Generation, tokenizer: Any, *, end_ids: tuple[int, ...]) -> Iterator[TextEvent]:
    """Text deltas of `generation`, holding back what a stop string may yet claim.

    Closing this iterator closes the generation, which rolls the target back to what was shown.
    """
    params = generation.params
    stream = TextStream(tokenizer, params.stop)
    tokens = iter(generation)
    try:
        for token in tokens:
            if token.id in end_ids:
                yield TextEvent(stream.finish(), token, "stop")
                return
            delta = stream.add(token.id)
            if stream.stopped:
                generation.stats.finish_reason = "stop"  # a stop string ended it, not the loop
                yield TextEvent(delta, token, "stop")
                return
            if len(generation.tokens) >= params.max_tokens:
                yield TextEvent(delta + stream.finish(), token, "length")
                return
            yield TextEvent(delta, token)
        yield TextEvent(stream.finish(), None, "length")  # the context ended the request first
    finally:
        tokens.close()  # rolls back what a stop string cut off
