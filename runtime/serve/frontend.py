"""Stage 0's OpenAI-compatible HTTP API over an `Engine` (stage 0 serves its `PipelineEngine`)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from layerline.errors import ContextLengthError, LayerlineError, StageUnavailableError

from .admission import Admission, ServerBusyError, ShuttingDownError
from .body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimit
from .metrics import BatchCollector, Metrics, StageCollector, StageGauge
from .openai_schema import (
    ApiError,
    ChatCompletionBody,
    CompletionBody,
    GenerationRequest,
    sampling_of,
    stop_list,
)
from .request_checks import check_fields, check_text, check_token_ids, completion_budget

log = logging.getLogger("layerline.frontend")


@dataclass(frozen=True)
class TokenLogprob:
    """A token's text, its raw bytes (part of a character, maybe), its logprob and the top alternatives."""

    token: str
    logprob: float
    raw: bytes
    top: list[TokenLogprob] = field(default_factory=list)


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
    vocab_size: int  # token ids 0..vocab_size-1 have embeddings

    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...
    def generate(self, request: GenerationRequest) -> Events: ...
    def status(self) -> dict[str, Any]: ...
    def is_ready(self) -> bool: ...
    def health(self) -> str: ...  # "ok" when ready; else why not (e.g. recovering, degraded)
    def confirm_health(self) -> tuple[str, str | None]: ...  # health() after asking the stages now, and why


class Events(Protocol):
    """A request's events; `close()` ends the request and frees what it holds."""

    def __iter__(self) -> Iterator[GenerationEvent]: ...
    def __next__(self) -> GenerationEvent: ...
    def close(self) -> None: ...


GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _from_layerline(exc: LayerlineError) -> ApiError:
    if isinstance(exc, ServerBusyError):
        return ApiError(429, str(exc), type="rate_limit_exceeded", code="rate_limit_exceeded",
                        headers={"retry-after": str(exc.retry_after_s)})
    if isinstance(exc, ShuttingDownError):
        return ApiError(503, str(exc), type="server_error", code="shutting_down")
    if isinstance(exc, StageUnavailableError):
        return ApiError(503, str(exc), type="server_error", code="stage_unavailable")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    return ApiError(400, str(exc))


def create_app(engine: Engine, *, stage_states: Callable[[], list[StageGauge]] | None = None,
               admission: Admission | None = None,
               batching: Callable[[], dict[str, Any] | None] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The HTTP app serving `engine`; `stage_states()` feeds the per-stage gauges, `batching()`
    the batch passes' (the scheduler's state, once it runs)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if admission is not None:
            # Queued requests wait for a slot in a worker thread, and decoding ones need threads
            # to stream: enough threads for all of them, so that waiting never starves decoding.
            limiter = anyio.to_thread.current_default_thread_limiter()
            limiter.total_tokens = max(limiter.total_tokens, admission.max_active + admission.max_queue + 16)
        yield

    app = FastAPI(title="layerline", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    metrics = Metrics()
    if stage_states is not None:
        metrics.registry.register(StageCollector(stage_states))
    if batching is not None:
        metrics.registry.register(BatchCollector(batching))
    if admission is not None:
        metrics.watch_admission(lambda: admission.active, lambda: admission.waiting)
    app.state.metrics = metrics

    def refuse(request: Request, error: ApiError) -> JSONResponse:
        if request.url.path in GENERATION_ENDPOINTS:
            metrics.requests.labels(request.url.path, str(error.status)).inc()
        return _error(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = str(first["msg"]).removeprefix("Value error, ")
        return refuse(request, ApiError(400, f"{where}: {message}" if where else message,
                                        param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body it cannot parse, an unknown path or method).
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 400:  # raised when the body is not UTF-8 JSON, or nested too deeply
            message = f"the request body could not be read as JSON ({message.lower()})"
        return refuse(request, ApiError(exc.status_code, message, type=kind))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return refuse(request, exc)

    @app.exception_handler(LayerlineError)
    async def _layerline_error(request: Request, exc: LayerlineError) -> JSONResponse:
        return refuse(request, _from_layerline(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("event=internal_error path=%s", request.url.path)
        return refuse(request, ApiError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                        code="internal_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        # Asks the stages now: a claim lost since the last heartbeat is seen here, not at the next.
        status, reason = await run_in_threadpool(engine.confirm_health)
        body = {"status": status} if reason is None else {"status": status, "reason": reason}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

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
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Any:
        _check_model(engine, body.model)
        check_fields(body)
        messages = [{"role": m.role, "content": m.text(f"messages[{i}].content")}
                    for i, m in enumerate(body.messages)]
        for i, message in enumerate(messages):
            check_text(message["content"], f"messages[{i}].content")
        prompt = await run_in_threadpool(engine.encode_chat, messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _serve(engine, metrics, "chat", body, prompt, logprobs, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        _check_model(engine, body.model)
        check_fields(body)
        if isinstance(body.prompt, list) and isinstance(body.prompt[0], int):
            prompt = list(body.prompt)  # token ids
            check_token_ids(prompt, engine.vocab_size)
        else:
            text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
            check_text(text, "prompt")
            prompt = await run_in_threadpool(engine.encode, text)
        return await _serve(engine, metrics, "completion", body, prompt, body.logprobs, request)

    return app


def _check_model(engine: Engine, model: str | None) -> None:
    if model and model != engine.model_id:
        raise ApiError(404, f"model {model!r} is not served here; this server serves "
                            f"{engine.model_id!r}", param="model", code="model_not_found")


async def _serve(engine: Engine, metrics: Metrics, kind: str, body: Any, prompt: list[int],
                 logprobs: int | None, http_request: Request) -> Any:
    if not engine.is_ready():
        raise ApiError(503, "the pipeline is not ready: a stage is down or still loading",
                       type="server_error", code="stage_unavailable")
    asked = body.max_completion_tokens or body.max_tokens
    stop = stop_list(body)
    for i, text in enumerate(stop):
        check_text(text, f"stop[{i}]")
    request = GenerationRequest(prompt_tokens=prompt,
                                max_tokens=completion_budget(len(prompt), asked, engine.context_length),
                                sampling=sampling_of(body), stop=stop,
                                logprobs=logprobs, speculative=body.speculative)
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    events = await run_in_threadpool(engine.generate, request)  # refuses (400, 429) before any token
    reply = _Reply(kind, engine.model_id, len(prompt), metrics)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_drive(reply.sse(events, include_usage, endpoint)),
                                 media_type="text/event-stream")
    try:
        result = await _collect_while_connected(reply, events, http_request)
    except LayerlineError as exc:
        metrics.requests.labels(endpoint, "error").inc()
        return _error(_from_layerline(exc))
    if result is None:
        metrics.requests.labels(endpoint, "aborted").inc()
        return None  # nobody is there to read an answer
    metrics.requests.labels(endpoint, "ok").inc()
    metrics.latency.labels(endpoint).observe(time.monotonic() - reply.started)
    return result


async def _collect_while_connected(reply: _Reply, events: Events,
                                   http_request: Request) -> dict[str, Any] | None:
    """The whole answer, collected in a worker thread; None when the client left first, which
    ends the request at its next token and frees its session on every stage."""
    left = threading.Event()

    async def watch() -> None:
        # After the body, the next message uvicorn gives is the disconnect.
        while (await http_request.receive())["type"] != "http.disconnect":
            pass
        left.set()

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        try:
            result = await run_in_threadpool(reply.collect, events, left)
        finally:
            group.cancel_scope.cancel()
    return None if left.is_set() else result


_DONE = object()


async def _drive(chunks: Iterator[str]) -> AsyncIterator[str]:
    """Stream a blocking generator's chunks, each computed in a worker thread.

    When the client goes away, the response task is cancelled once the chunk being computed
    is done; the generator is then closed at once (not whenever garbage collection runs),
    which ends its request and frees its session on every stage.
    """
    try:
        while True:
            chunk = await run_in_threadpool(next, chunks, _DONE)
            if chunk is _DONE:
                return
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(chunks.close)


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
            def entry(t: TokenLogprob) -> dict[str, Any]:
                return {"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)}

            return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t.top]} for t in items]}
        return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [{a.token: a.logprob for a in t.top} for t in items]}

    def collect(self, events: Events, left: threading.Event) -> dict[str, Any]:
        """The answer's body from every event, ending the request early once `left` is set."""
        text, finish, logprobs = [], "length", []
        endpoint = "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"
        try:
            for event in events:
                if left.is_set():
                    break  # the client is gone: close the request now
                self._count(event, endpoint)
                text.append(event.text)
                logprobs += event.logprobs or []
                if event.finish_reason:
                    finish = event.finish_reason
        finally:
            events.close()
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

    def sse(self, events: Events, include_usage: bool, endpoint: str) -> Iterator[str]:
        status = "aborted"  # until the stream ends or fails
        try:
            if self.kind == "chat":
                yield self._chunk({"role": "assistant", "content": ""}, None)
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
            status = "ok"
            yield "data: [DONE]\n\n"
        except LayerlineError as exc:
            status = "error"
            yield f"data: {json.dumps(_from_layerline(exc).body())}\n\n"
        finally:
            events.close()
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - self.started)
