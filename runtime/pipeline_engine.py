"""The frontend's Engine over the split pipeline: prompts in, streamed tokens out.

One request is one session on every stage. Prefill goes through in chunks of
at most `max_batch_tokens` positions, then one position per step.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx

from layerline.packager.manifest import Manifest

from .chat import chat_prompt_tokens, text_prompt_tokens
from .frontend import GenerationEvent, TokenLogprob
from .openai_schema import GenerationRequest
from .pipeline import Pipeline, PipelineSession
from .sampling import Sampler, SamplingParams, log_softmax
from .tokenizer import TextStream

log = logging.getLogger("layerline.engine")


class PipelineEngine:
    def __init__(self, manifest: Manifest, tokenizer: Any, pipeline: Pipeline, *, context_length: int,
                 end_ids: tuple[int, ...], max_batch_tokens: int,
                 status: Callable[[], dict[str, Any]], ready: Callable[[], bool]) -> None:
        self.manifest = manifest
        self.model_id = manifest.model.id
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.context_length = context_length
        self.end_ids = end_ids
        self.max_batch_tokens = max_batch_tokens
        self._status = status
        self._ready = ready

    def encode(self, text: str) -> list[int]:
        return text_prompt_tokens(self.tokenizer, text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_tokens(self.tokenizer, self.manifest, messages)

    def status(self) -> dict[str, Any]:
        return self._status()

    def is_ready(self) -> bool:
        return self._ready()

    def _prefill(self, session: PipelineSession, prompt: list[int]) -> mx.array:
        logits = None
        for start in range(0, len(prompt), self.max_batch_tokens):
            logits = session.forward(prompt[start:start + self.max_batch_tokens], start)
        assert logits is not None
        return logits[-1:]

    def generate(self, request: GenerationRequest) -> Iterator[GenerationEvent]:
        """Tokens for one request, as text deltas; the last event says why it finished."""
        s = request.sampling
        params = SamplingParams(
            max_tokens=request.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            min_p=s.min_p, repetition_penalty=s.repetition_penalty, seed=s.seed,
            stop=tuple(request.stop), stop_token_ids=self.end_ids,
            logprobs=request.logprobs is not None, top_logprobs=request.logprobs or 0)
        sampler = Sampler(params, request.prompt_tokens)
        session = self.pipeline.open(f"s-{uuid.uuid4().hex[:16]}")
        text = TextStream(self.tokenizer, params.stop)
        started = time.monotonic()
        produced = 0
        finish = "length"
        try:
            logits = self._prefill(session, request.prompt_tokens)
            position = len(request.prompt_tokens)
            while produced < params.max_tokens:
                token = int(sampler(logits).item())
                produced += 1
                logprobs = self._logprobs(logits, token, params.top_logprobs) if params.logprobs else None
                if token in self.end_ids:
                    finish = "stop"
                    yield GenerationEvent(text.finish(), [token], logprobs, finish_reason=finish)
                    return
                delta = text.add(token)
                if text.stopped:
                    finish = "stop"
                    yield GenerationEvent(delta, [token], logprobs, finish_reason=finish)
                    return
                if produced == params.max_tokens:
                    yield GenerationEvent(delta + text.finish(), [token], logprobs, finish_reason=finish)
                    return
                yield GenerationEvent(delta, [token], logprobs)
                logits = session.forward([token], position)[-1:]
                position += 1
        finally:
            session.close()
            elapsed = time.monotonic() - started
            log.info("event=request_done prompt_tokens=%d tokens=%d finish=%s seconds=%.2f tok_s=%.1f",
                     len(request.prompt_tokens), produced, finish, elapsed,
                     produced / elapsed if elapsed > 0 else 0.0)

    def _logprobs(self, logits: mx.array, token: int, top: int) -> list[TokenLogprob]:
        values = log_softmax(logits)[0]
        chosen = float(values[token].item())
        alternatives: list[tuple[str, float]] = []
        if top:
            best = mx.argsort(-values)[:top].tolist()
            alternatives = [(self.tokenizer.decode([i]), float(values[i].item())) for i in best]
        return [TokenLogprob(self.tokenizer.decode([token]), chosen, alternatives)]
