"""Stage 0's OpenAI-compatible HTTP API over an `Engine` (stage 0 serves its `PipelineEngine`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from layerline.errors import LayerlineError, StageUnavailableError

from .openai_schema import (
    ApiError,
    ChatCompletionBody,
    CompletionBody,
    GenerationRequest,
    sampling_of,
    stop_list,
)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationEvent:
    """Some new text; the last event of a generation has `finish_reason` set."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length"
    stats: dict[str, Any] | None = None  # on the last event: e.g. speculation counters


class Engine(Protocol):
    model_id: str
    context_length: int

    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...
    def generate(self, request: GenerationRequest) -> Iterator[GenerationEvent]: ...
    def status(self) -> dict[str, Any]: ...
    def is_ready(self) -> bool: ...


class Metrics:
    """The frontend's Prometheus metrics, in a registry of the app's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("layerline_requests", "HTTP generation requests",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("layerline_prompt_tokens", "Prompt tokens processed",
                                     registry=self.registry)
        self.completion_tokens = Counter("layerline_completion_tokens", "Tokens generated",
                                         registry=self.registry)
        self.latency = Histogram("layerline_request_seconds", "Request wall time",
                                 ["endpoint"], registry=self.registry)
        self.first_token = Histogram("layerline_time_to_first_token_seconds", "Time to first token",
                                     ["endpoint"], registry=self.registry)
        self.speculation = SpeculationMetrics(self.registry)


class SpeculationMetrics:
    """Cumulative speculation counters, and the accept rate and tokens per pass they give."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("layerline_speculative_requests", "Requests by decoding mode",
                                ["mode"], registry=registry)
        self.drafted = Counter("layerline_speculative_drafted_tokens", "Draft tokens sent for verification",
                               registry=registry)
        self.accepted = Counter("layerline_speculative_accepted_tokens", "Draft tokens accepted",
                                registry=registry)
        self.tokens = Counter("layerline_speculative_tokens", "Tokens emitted by speculating requests",
                              registry=registry)
        self.passes = Counter("layerline_speculative_target_passes",
                              "Target passes (verification steps) of speculating requests", registry=registry)
        self.draft_seconds = Counter("layerline_speculative_draft_seconds",
                                     "Time the drafter spent proposing", registry=registry)
        self.verify_seconds = Counter("layerline_speculative_verify_seconds",
                                      "Time spent in target passes verifying drafts", registry=registry)
        self._totals = {"drafted": 0.0, "accepted": 0.0, "tokens": 0.0, "passes": 0.0}
        Gauge("layerline_speculative_accept_rate", "Accepted / drafted tokens, since start",
              registry=registry).set_function(lambda: self._ratio("accepted", "drafted"))
        Gauge("layerline_speculative_tokens_per_pass", "Tokens emitted per target pass, since start",
              registry=registry).set_function(lambda: self._ratio("tokens", "passes"))

    def _ratio(self, top: str, bottom: str) -> float:
        return self._totals[top] / self._totals[bottom] if self._totals[bottom] else 0.0

    def record(self, usage: dict[str, Any]) -> None:
        """Count one finished request's `usage.speculative`."""
        if not usage.get("enabled"):
            self.requests.labels("plain").inc()
            return
        self.requests.labels("speculative").inc()
        for key, counter, value in (("drafted", self.drafted, usage["drafted"]),
                                    ("accepted", self.accepted, usage["accepted"]),
                                    ("tokens", self.tokens, usage["tokens"]),
                                    ("passes", self.passes, usage["target_passes"])):
            counter.inc(value)
            self._totals[key] += value
        self.draft_seconds.inc(usage["draft_seconds"])
        self.verify_seconds.inc(usage["verify_seconds"])


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _from_layerline(exc: LayerlineError) -> ApiError:
    if isinstance(exc, StageUnavailableError):
        return ApiError(503, str(exc), type="server_error", code="stage_unavailable")
    return ApiError(400, str(exc))


class _StageCollector:
    """`layerline_stage_up{stage, endpoint}`: 1 while a stage is ready, read at scrape time."""

    def __init__(self, states: Callable[[], list[tuple[str, str, bool]]]) -> None:
        self.states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("layerline_stage_up", "1 if the stage is ready, else 0",
                                  labels=["stage", "endpoint"])
        for stage, endpoint, up in self.states():
            gauge.add_metric([stage, endpoint], 1.0 if up else 0.0)
        yield gauge


def create_app(engine: Engine, *,
               stage_states: Callable[[], list[tuple[str, str, bool]]] | None = None) -> FastAPI:
    """The HTTP app serving `engine`; `stage_states()` feeds the per-stage gauge."""
    app = FastAPI(title="layerline", docs_url=None, redoc_url=None)
    metrics = Metrics()
    if stage_states is not None:
        metrics.registry.register(_StageCollector(stage_states))
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(ApiError(400, f"{where}: {first['msg']}" if where else first["msg"],
                               param=where or None))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(LayerlineError)
    async def _layerline_error(request: Request, exc: LayerlineError) -> JSONResponse:
        return _error(_from_layerline(exc))

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = engine.is_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"},
                            status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "layerline"}]}

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return await run_in_threadpool(engine.status)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody) -> Any:
        _check_model(engine, body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = await run_in_threadpool(engine.encode_chat, messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _serve(engine, metrics, "chat", body, prompt, logprobs)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        _check_model(engine, body.model)
        if isinstance(body.prompt, str):
            prompt = await run_in_threadpool(engine.encode, body.prompt)
        elif isinstance(body.prompt[0], str):
            prompt = await run_in_threadpool(engine.encode, body.prompt[0])
        else:
            prompt = list(body.prompt)  # token ids
        return await _serve(engine, metrics, "completion", body, prompt, body.logprobs)

    return app


def _check_model(engine: Engine, model: str | None) -> None:
    if model and model != engine.model_id:
        raise ApiError(404, f"model {model!r} is not served here; this server serves "
                            f"{engine.model_id!r}", param="model", code="model_not_found")


async def _serve(engine: Engine, metrics: Metrics, kind: str, body: Any, prompt: list[int],
                 logprobs: int | None) -> Any:
    if not engine.is_ready():
        raise ApiError(503, "the pipeline is not ready: a stage is down or still loading",
                       type="server_error", code="stage_unavailable")
    room = engine.context_length - len(prompt)
    if room <= 0:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context length is "
                            f"{engine.context_length}", param="messages", code="context_length_exceeded")
    asked = body.max_completion_tokens or body.max_tokens
    request = GenerationRequest(prompt_tokens=prompt, max_tokens=min(asked or room, room),
                                sampling=sampling_of(body), stop=stop_list(body),
                                logprobs=logprobs, speculative=body.speculative)
    reply = _Reply(kind, engine.model_id, len(prompt), metrics)
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    events = engine.generate(request)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(iterate_in_threadpool(reply.sse(events, include_usage, endpoint)),
                                 media_type="text/event-stream")
    try:
        result = await run_in_threadpool(reply.collect, events)
    except LayerlineError as exc:
        metrics.requests.labels(endpoint, "error").inc()
        return _error(_from_layerline(exc))
    metrics.requests.labels(endpoint, "ok").inc()
    metrics.latency.labels(endpoint).observe(time.monotonic() - reply.started)
    return result


class _Reply:
    """Builds OpenAI response bodies and SSE chunks from engine events."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, metrics: Metrics) -> None:
        self.kind, self.model, self.prompt_tokens, self.metrics = kind, model, prompt_tokens, metrics
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.stats: dict[str, Any] = {}
        metrics.prompt_tokens.inc(prompt_tokens)

    def _count(self, event: GenerationEvent, endpoint: str) -> None:
        if event.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.metrics.first_token.labels(endpoint).observe(self.first_token_at - self.started)
        self.completion_tokens += len(event.token_ids)
        self.metrics.completion_tokens.inc(len(event.token_ids))
        if event.stats:
            self.stats = event.stats
            if "speculative" in event.stats:
                self.metrics.speculation.record(event.stats["speculative"])

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens,
                                 "completion_tokens": self.completion_tokens,
                                 "total_tokens": self.prompt_tokens + self.completion_tokens}
        usage.update(self.stats)
        return usage

    def _logprobs_json(self, items: list[TokenLogprob]) -> dict[str, Any]:
        if self.kind == "chat":
            return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
                                 "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                                                  for s, lp in t.top]} for t in items]}
        return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [dict(t.top) for t in items]}

    def collect(self, events: Iterator[GenerationEvent]) -> dict[str, Any]:
        text, finish, logprobs = [], "length", []
        endpoint = "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"
        for event in events:
            self._count(event, endpoint)
            text.append(event.text)
            logprobs += event.logprobs or []
            if event.finish_reason:
                finish = event.finish_reason
        content = "".join(text)
        has_logprobs = any(True for _ in logprobs)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": content},
                      "finish_reason": finish,
                      "logprobs": self._logprobs_json(logprobs) if has_logprobs else None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish,
                      "logprobs": self._logprobs_json(logprobs) if has_logprobs else None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}

    def _chunk(self, delta_or_text: Any, finish: str | None, logprobs: Any = None) -> str:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish, "logprobs": logprobs}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta_or_text, "finish_reason": finish, "logprobs": logprobs}
            obj = "text_completion"
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    def sse(self, events: Iterator[GenerationEvent], include_usage: bool, endpoint: str) -> Iterator[str]:
        if self.kind == "chat":
            yield self._chunk({"role": "assistant", "content": ""}, None)
        status = "ok"
        try:
            for event in events:
                self._count(event, endpoint)
                logprobs = self._logprobs_json(event.logprobs) if event.logprobs else None
                if event.text or logprobs:
                    payload = {"content": event.text} if self.kind == "chat" else event.text
                    yield self._chunk(payload, None, logprobs)
                if event.finish_reason:
                    yield self._chunk({} if self.kind == "chat" else "", event.finish_reason)
            if include_usage:
                data = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat"
                        else "text_completion", "created": self.created, "model": self.model,
                        "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        except LayerlineError as exc:
            status = "error"
            yield f"data: {json.dumps(_from_layerline(exc).body())}\n\n"
        finally:
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - self.started)
