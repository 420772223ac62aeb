"""The single-process generation loop: prefill, then one token per step, streamed.

Like mlx-lm's `generate_step`, step n+1 is queued (`mx.async_eval`) before
token n is read back, so building the graph overlaps the compute. A stop is
therefore seen one step late; the cache is rolled back to the prompt plus
every generated token but the last when the loop ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx

from layerline.errors import ContextLengthError

from ..model.kv_cache import RangeCache
from ..model.tokenizer import TextStream
from .sampling import Sampler, SamplingParams, log_softmax

PREFILL_STEP = 2048  # positions per prefill chunk, as mlx-lm's default


class LogitsModel(Protocol):
    """Anything that maps token ids (B, L) and per-range caches to logits (B, L, vocab)."""

    def __call__(self, tokens: mx.array, caches: list[RangeCache]) -> mx.array: ...


@dataclass(frozen=True)
class GeneratedToken:
    id: int  # a stop token appears only to carry text held back for a stop string
    text: str  # text this token lets the stream show now (may be empty, or more than one token's)
    logprob: float | None = None  # the model's log-probability of the token
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the most likely alternatives, best first


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int = 0
    prefill_s: float = 0.0  # prompt processing through the first token
    decode_s: float = 0.0  # from the first token to the last
    finish_reason: str = ""  # "stop" | "length"

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def describe(self) -> str:
        """`prefill 31 tok 412.3 tok/s, decode 64 tok 52.1 tok/s, finish=stop`."""
        return (
            f"prefill {self.prompt_tokens} tok {self.prefill_tps:.1f} tok/s, "
            f"decode {self.generated_tokens} tok {self.decode_tps:.1f} tok/s, "
            f"finish={self.finish_reason}"
        )


def check_prompt(prompt: list[int], context_length: int | None, cached: int = 0) -> None:
    """Raise ContextLengthError unless the prompt is non-empty and leaves room for a token."""
    if not prompt:
        raise ContextLengthError("the prompt is empty", hint="give at least one token of prompt")
    if context_length is not None and cached + len(prompt) >= context_length:
        held = f" after the {cached} positions this session holds" if cached else ""
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens{held}, but the model's context length is "
            f"{context_length}",
            hint=f"shorten the prompt to fewer than {context_length - cached} tokens",
        )


@dataclass
class Generation:
    """One request's token stream: iterate for tokens, then read `stats` and `text`."""

    model: LogitsModel
    caches: list[RangeCache]
    prompt: list[int]
    params: SamplingParams
    tokenizer: Any = None
    context_length: int | None = None
    stats: GenerationStats = field(init=False)
    text: str = field(init=False, default="")
    tokens: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        check_prompt(self.prompt, self.context_length, self.caches[0].length if self.caches else 0)
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))

    def __iter__(self) -> Iterator[GeneratedToken]:
        if self.stats.finish_reason or self.tokens:
            raise RuntimeError("a Generation runs once; call generate() again for another")
        params = self.params
        stream = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        stop_ids = set(params.stop_token_ids)
        start_length = self.caches[0].length if self.caches else 0
        limit = params.max_tokens
        if self.context_length is not None:
            # Token n is fed at position start + len(prompt) + n; positions end at the context.
            limit = min(limit, self.context_length - start_length - len(self.prompt) + 1)
        sampler = Sampler(params, self.prompt)
        started = time.perf_counter()
        first_at = started
        try:
            token, logprobs = self._prefill(sampler)
            n = 0
            while True:
                if n + 1 < limit:
                    next_token, next_logprobs = self._step(token, sampler)
                    mx.async_eval(next_token, *([] if next_logprobs is None else [next_logprobs]))
                token_id = int(token.item())
                n += 1
                if n == 1:
                    first_at = time.perf_counter()
                    self.stats.prefill_s = first_at - started
                self.stats.generated_tokens = n
                self.stats.decode_s = time.perf_counter() - first_at
                if token_id in stop_ids:
                    self.stats.finish_reason = "stop"
                    rest = stream.finish() if stream is not None else ""
                    if rest:  # text held back for a stop string that never came
                        yield self._event(token_id, rest, logprobs)
                    break
                self.tokens.append(token_id)
                text = stream.add(token_id) if stream is not None else ""
                stopped = stream is not None and stream.stopped
                if n >= limit and stream is not None and not stopped:
                    text += stream.finish()
                yield self._event(token_id, text, logprobs)
                if stopped:
                    self.stats.finish_reason = "stop"
                    break
                if n >= limit:
                    self.stats.finish_reason = "length"
                    break
                token, logprobs = next_token, next_logprobs
        finally:
            if stream is not None:
                self.text = stream.text
            self._rewind(start_length)

    def _prefill(self, sampler: Sampler) -> tuple[mx.array, mx.array | None]:
        prompt = mx.array(self.prompt, dtype=mx.uint32)
        done = 0
        while len(self.prompt) - done > 1:
            n = min(PREFILL_STEP, len(self.prompt) - done - 1)
            self.model(prompt[None, done:done + n], self.caches)
            mx.eval([c.state for rc in self.caches for c in rc.caches])
            done += n
        token, logprobs = self._step(prompt[done:], sampler)
        mx.async_eval(token, *([] if logprobs is None else [logprobs]))
        return token, logprobs

    def _step(self, tokens: mx.array, sampler: Sampler) -> tuple[mx.array, mx.array | None]:
        logits = self.model(tokens[None], self.caches)[:, -1, :]
        logprobs = log_softmax(logits)[0] if self.params.logprobs else None
        return sampler(logits), logprobs

    def _event(self, token_id: int, text: str, logprobs: mx.array | None) -> GeneratedToken:
        if logprobs is None:
            return GeneratedToken(token_id, text)
        top: tuple[tuple[int, float], ...] = ()
        if self.params.top_logprobs:
            k = self.params.top_logprobs
            best = mx.argpartition(-logprobs, kth=k - 1)[:k]
            values = logprobs[best]
            order = mx.argsort(-values)
            top = tuple(zip(best[order].tolist(), values[order].tolist(), strict=True))
        return GeneratedToken(token_id, text, float(logprobs[token_id].item()), top)

    def _rewind(self, start_length: int) -> None:
        # The prompt and every generated token but the last were fed; drop the step run ahead.
        keep = start_length + len(self.prompt) + max(self.stats.generated_tokens - 1, 0)
        for cache in self.caches:
            if cache.length > keep and cache.can_truncate(keep):
                cache.truncate(keep)


def generate(model: LogitsModel, caches: list[RangeCache], prompt: list[int],
             params: SamplingParams, *, tokenizer: Any = None,
             context_length: int | None = None) -> Generation:
    """Stream tokens for `prompt`, continuing the session held in `caches`."""
    return Generation(model, caches, list(prompt), params, tokenizer, context_length)
