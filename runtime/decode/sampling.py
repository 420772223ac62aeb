"""Choosing the next token from logits: greedy or sampled, reproducible from a seed.

Order of operations, as llama.cpp's default chain: repetition penalty, then
top-k, top-p and min-p filtering of the model's distribution, then temperature,
then a categorical draw with the request's own PRNG key, so one request's seed
never depends on what other requests drew.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import mlx.core as mx

from layerline.errors import SamplingError

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "a whole number of at least 1")
        _check(_finite(self.temperature) and self.temperature >= 0,
               "temperature", self.temperature, "a number >= 0 (0 is greedy)")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               "top_k", self.top_k, "a whole number >= 0 (0 is off)")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "a number > 0 (1 is off)")
        _check(isinstance(self.repetition_context, int) and self.repetition_context >= 1,
               "repetition_context", self.repetition_context, "a whole number of at least 1")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
               "seed", self.seed, "a whole number in [0, 2**63)")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop", self.stop, "non-empty strings")
        _check(isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               "top_logprobs", self.top_logprobs, f"a whole number in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise SamplingError(f"invalid {name} {value!r}", hint=f"{name} must be {expected}")


class Sampler:
    """One request's token chooser: holds its PRNG key and its recent tokens."""

    def __init__(self, params: SamplingParams, prompt: list[int] | None = None) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._key = mx.random.key(seed)
        recent = (prompt or [])[-params.repetition_context:]
        self._recent = mx.array(recent, dtype=mx.uint32)

    def __call__(self, logits: mx.array) -> mx.array:
        """Logits (1, vocab) of the next position -> the chosen token id, shape (1,), lazily."""
        p = self.params
        logits = penalize(logits, self._recent, p.repetition_penalty)
        if p.greedy:
            token = mx.argmax(logits, axis=-1)
        else:
            logits = filter_logits(logits.astype(mx.float32), p)
            self._key, key = mx.random.split(self._key)
            token = mx.random.categorical(logits * (1 / p.temperature), axis=-1, key=key)
        if p.repetition_penalty != 1.0:
            self._recent = mx.concatenate([self._recent, token.astype(mx.uint32)])[
                -p.repetition_context:
            ]
        return token


def penalize(logits: mx.array, recent: mx.array, penalty: float) -> mx.array:
    """Logits (B, V) with the recent tokens' logits pushed away from zero (CTRL's rule).

    `recent` is one history (H,) for every row, or one per row (B, H).
    """
    if penalty == 1.0 or recent.size == 0:
        return logits
    index = recent if recent.ndim == 2 else mx.broadcast_to(recent, (logits.shape[0], recent.size))
    chosen = mx.take_along_axis(logits, index, axis=-1)
    chosen = mx.where(chosen < 0, chosen * penalty, chosen / penalty)
    return mx.put_along_axis(logits, index, chosen, axis=-1)


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Logits with what the request's top-k, top-p and min-p exclude set to -inf, in that order."""
    if params.top_k:
        logits = _top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    if params.min_p > 0.0:
        logits = _min_p(logits, params.min_p)
    return logits


def _top_k(logits: mx.array, k: int) -> mx.array:
    vocab = logits.shape[-1]
    if k >= vocab:
        return logits
    dropped = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logits, dropped, mx.array(-mx.inf, logits.dtype), axis=-1)


def _top_p(logits: mx.array, top_p: float) -> mx.array:
    # Keep the smallest set of most likely tokens whose probabilities reach top_p.
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs
    sorted_kept = mx.where(mass_before < top_p, sorted_logits, -mx.inf)
    return mx.put_along_axis(logits, order, sorted_kept, axis=-1)


def _min_p(logits: mx.array, min_p: float) -> mx.array:
    # Drop tokens less likely than min_p times the most likely one.
    threshold = logits.max(axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logits >= threshold, logits, -mx.inf)


def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities of logits along the vocabulary axis."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
