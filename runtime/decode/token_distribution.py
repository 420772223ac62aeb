"""A request's sampling rule as probabilities, row by row, for drafting and verification.

The same steps, in the same order, as `sampling.Sampler`: repetition penalty over the
recent tokens, then top-k, top-p and min-p on the logits, then temperature. Speculation
needs the distributions themselves (p of the target, q of the draft), not just a draw.
"""

from __future__ import annotations

import secrets

import mlx.core as mx

from .sampling import SamplingParams, filter_logits, penalize


def recent_tokens(history: list[int] | mx.array, params: SamplingParams) -> mx.array:
    """The tokens the repetition penalty looks at, as uint32."""
    if isinstance(history, mx.array):
        return history[-params.repetition_context:].astype(mx.uint32)
    return mx.array(history[-params.repetition_context:], dtype=mx.uint32)


def recent_rows(committed: list[int], drafts: list[int], params: SamplingParams) -> mx.array:
    """The penalty's history of each verification row (len(drafts) + 1, H): row i follows
    committed + drafts[:i]. Short rows repeat their first token (a repeat changes nothing)."""
    context = params.repetition_context
    return padded_rows([(committed + drafts[:i])[-context:] for i in range(len(drafts) + 1)])


def padded_rows(histories: list[list[int]]) -> mx.array:
    """Histories as one array (rows, H): short rows repeat their first token (a repeat changes nothing)."""
    width = max(len(h) for h in histories)
    return mx.array([[h[0]] * (width - len(h)) + h for h in histories], dtype=mx.uint32)


def scores(logits: mx.array, recent: mx.array, params: SamplingParams) -> mx.array:
    """Float32 logits (B, V) after the repetition penalty: what greedy takes the argmax of."""
    # Penalized in the logits' own dtype, then cast, exactly as Sampler does.
    return penalize(logits, recent, params.repetition_penalty).astype(mx.float32)


def probabilities(logits: mx.array, recent: mx.array, params: SamplingParams) -> mx.array:
    """Probabilities (B, V) the request samples from: penalty, top-k/top-p/min-p, temperature."""
    if params.greedy:
        raise ValueError("a greedy request has no sampling distribution; use scores() and argmax")
    logits = filter_logits(scores(logits, recent, params), params)
    return mx.softmax(logits * (1 / params.temperature), axis=-1)


def request_key(seed: int | None, stream: int) -> mx.array:
    """The PRNG key of one of a request's random streams (0: verification, 1: the draft)."""
    base = mx.random.key(seed if seed is not None else secrets.randbits(63))
    return mx.random.split(base, stream + 1)[stream]
