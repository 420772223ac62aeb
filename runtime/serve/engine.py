"""The frontend's Engine over the split pipeline: prompts in, streamed tokens out.

One request is one session on every stage, and runs its own decode loop. Prefill goes
through in chunks of at most `prefill_step` positions; then each step submits the last
token plus the request's drafts (none when it decodes plainly). The scheduler
(`stage0/scheduler.py`) runs the submissions of every request in batch passes; while others
share them, a request drafts only the window worth its rows (`decode/batch_window.py`).
With the `tree` setting a drafting step verifies a token tree instead (the plan's tree policy
picks its shape, counting its nodes as rows beside the other sessions'); the trees of several
requests go whole into the same batch passes.

Requests decode on a fixed pool of threads, one per request admitted to decode at once:
mlx keeps a worker for every thread that ever evaluated, so a thread per request would
leave the process one more thread per request served, for ever.

`generate` checks a request and admits it before it returns, so that a bad or
unadmitted request is answered with an HTTP error before any token is streamed; its
events must be closed (`Events.close`), which releases the request's session and slot
at once, whether or not the client read to the end.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from layerline.packager.manifest import Manifest

from ..decode.batch_window import window_cap
from ..decode.loop import GenerationStats, StepRecord, Token, compress_windows, generate
from ..decode.sampling import SamplingParams
from ..decode.text import text_events
from ..model.chat import chat_prompt_tokens, text_prompt_tokens
from ..model.tokenizer import TokenBytes
from ..stage0.pipeline import Pipeline
from ..stage0.scheduler import BatchScheduler, BatchSession
from ..stage0.speculation.plan import SpeculationPlan, SpeculationPlanner
from ..stage0.target import PipelineTarget
from .admission import Admission, ShuttingDownError, Ticket
from .frontend import GenerationEvent, TokenLogprob
from .openai_schema import GenerationRequest
from .profile import PassProfile

log = logging.getLogger("layerline.engine")


class PipelineEngine:
    def __init__(self, manifest: Manifest, tokenizer: Any, pipeline: Pipeline, *, context_length: int,
                 end_ids: tuple[int, ...], prefill_step: int, speculation: SpeculationPlanner,
                 status: Callable[[], dict[str, Any]], ready: Callable[[], bool],
                 confirm_health: Callable[[], tuple[str, str | None]],
                 admission: Admission, scheduler: BatchScheduler,
                 profile: PassProfile | None = None) -> None:
        self.manifest = manifest
        self.model_id = manifest.model.id
        self.tokenizer = tokenizer
        self.token_bytes = TokenBytes(tokenizer)
        self.pipeline = pipeline
        self.context_length = context_length
        self.end_ids = end_ids
        self.prefill_step = prefill_step
        self.speculation = speculation
        self._status = status
        self._ready = ready
        self._confirm_health = confirm_health
        self.admission = admission
        self.scheduler = scheduler
        self.profile = profile or PassProfile()
        self.vocab_size = pipeline.head.vocab_size
        self._stopping = threading.Event()
        self._drafting: dict[str, bool] = {}  # request session -> its last step drafted
        # As many threads as requests decode at once (admission never admits more).
        self._decoders = ThreadPoolExecutor(max_workers=admission.max_active, thread_name_prefix="decode")
        speculation.serve_target(supports_trees=pipeline.supports_trees)

    @property
    def speculating(self) -> int:
        """Requests whose last step drafted."""
        return sum(self._drafting.values())

    def _on_step(self, session_id: str, step: StepRecord) -> None:
        self._drafting[session_id] = step.drafted > 0
        self.profile.record(session_id, step)

    def encode(self, text: str) -> list[int]:
        return text_prompt_tokens(self.tokenizer, text, max_tokens=self.context_length)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_tokens(self.tokenizer, self.manifest, messages, max_tokens=self.context_length)

    def status(self) -> dict[str, Any]:
        return self._status()

    def is_ready(self) -> bool:
        return self._ready()

    def health(self) -> str:
        """ok, or why the pipeline takes no requests (recovering, degraded, unavailable)."""
        return self._status()["health"]

    def confirm_health(self) -> tuple[str, str | None]:
        """health() after asking every stage for its claim now, and why it is not ok (None if it is)."""
        return self._confirm_health()

    def shutdown(self) -> None:
        """Admit nothing more; requests in flight end at their next token."""
        self._stopping.set()
        self.admission.close()
        self.scheduler.close()
        self._decoders.shutdown(wait=False)

    def generate(self, request: GenerationRequest) -> Events:
        """Check and admit `request` (raising now if it cannot run), then its events."""
        s = request.sampling
        params = SamplingParams(
            max_tokens=request.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            min_p=s.min_p, repetition_penalty=s.repetition_penalty, seed=s.seed,
            stop=tuple(request.stop), stop_token_ids=self.end_ids,
            logprobs=request.logprobs is not None, top_logprobs=request.logprobs or 0)
        self.pipeline.check_tokens(request.prompt_tokens)
        ticket = self.admission.enter()
        return Events(lambda: self._decode(request, params), ticket, self._decoders)

    def _decode(self, request: GenerationRequest, params: SamplingParams) -> Iterator[GenerationEvent]:
        session = self.scheduler.open(f"s-{uuid.uuid4().hex[:16]}")
        try:
            plan = self.speculation.plan(
                request.speculative, params, context_length=self.context_length,
                lock=self.pipeline.compute_lock,
                load=lambda: (session.sessions_sharing, self.scheduler.pass_samples()))
        except BaseException:
            session.close()
            raise
        cap = window_cap(lambda: session.sessions_sharing, self.scheduler.pass_samples,
                         lambda: self.speculation.costs.draft_s_per_token)
        # A tree's nodes are its rows in a shared pass: its policy weighs them against the load itself.
        generation = generate(PipelineTarget(session), request.prompt_tokens, params, drafter=plan.drafter,
                              policy=plan.policy, context_length=self.context_length,
                              prefill_step=self.prefill_step,
                              on_step=lambda step: self._on_step(session.session_id, step),
                              overlap=plan.overlap, run_ahead=plan.run_ahead,
                              window_cap=cap if plan.tree is None else None, tree=plan.tree)
        events = text_events(generation, self.tokenizer, end_ids=self.end_ids)
        started = time.monotonic()
        try:
            for event in events:
                if self._stopping.is_set():
                    raise ShuttingDownError("the server is shutting down; the request was cut short",
                                            hint="send it again to another server")
                token = event.token
                logprobs = self._logprobs(token) if params.logprobs and token is not None else None
                out = GenerationEvent(event.text, [token.id] if token is not None else [], logprobs)
                if event.finish_reason is not None:
                    yield dataclasses.replace(out, finish_reason=event.finish_reason, stats={
                        "speculative": speculation_usage(plan, generation.stats, session)})
                    return
                yield out
        finally:
            events.close()  # rolls back what a stop string cut off
            self._drafting.pop(session.session_id, None)
            session.close()
            if plan.close is not None:
                plan.close()
            self._record(plan, generation.stats, time.monotonic() - started)

    def _record(self, plan: SpeculationPlan, stats: GenerationStats, seconds: float) -> None:
        tree = f"tree={plan.tree.kind} " if plan.tree is not None else ""
        mode = (f"strategy={plan.strategy} window_policy={plan.policy.kind} {tree}{stats.describe()}"
                if plan.speculating else f"speculation=off reason={plan.reason!r}")
        log.info("event=request_done prompt_tokens=%d tokens=%d seconds=%.2f tok_s=%.1f %s",
                 stats.prompt_tokens, stats.tokens, seconds,
                 stats.tokens / seconds if seconds > 0 else 0.0, mode)

    def _logprobs(self, token: Token) -> list[TokenLogprob]:
        decode, raw = self.tokenizer.decode, self.token_bytes
        alternatives = [TokenLogprob(decode([i]), logprob, raw(i)) for i, logprob in token.top_logprobs]
        return [TokenLogprob(decode([token.id]), float(token.logprob or 0.0), raw(token.id), alternatives)]


class Events:
    """One admitted request's events; `close()` ends it and frees its slot, read to the end or not.

    The first read waits for a decoding slot; then the request decodes on one thread of the
    engine's pool, which hands its events over: mlx evaluates a graph only on the thread that
    built it, and the HTTP server reads a stream from whichever worker thread is free.
    """

    def __init__(self, decode: Callable[[], Iterator[GenerationEvent]], ticket: Ticket,
                 decoders: ThreadPoolExecutor) -> None:
        self._decode = decode
        self._ticket = ticket
        self._decoders = decoders
        self._events: queue.Queue[GenerationEvent | BaseException | None] = queue.Queue()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._started = False

    def __iter__(self) -> Events:
        return self

    def __next__(self) -> GenerationEvent:
        if not self._started:
            self._ticket.wait()  # queued requests wait here, before any model work
            if self._stop.is_set():
                raise StopIteration  # closed while it waited
            try:
                self._decoders.submit(self._run)
            except RuntimeError as exc:  # the pool is shut down: the server is stopping
                raise ShuttingDownError("the server is shutting down",
                                        hint="send it to another server") from exc
            self._started = True
        item = self._events.get()
        if item is None:
            self._events.put(None)  # ended: so it stays
            raise StopIteration
        if isinstance(item, BaseException):
            self._events.put(None)
            raise item
        return item

    def _run(self) -> None:
        events = self._decode()
        try:
            for event in events:
                self._events.put(event)
                if self._stop.is_set():
                    break
            self._events.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who raises it
            self._events.put(exc)
        finally:
            events.close()  # here, on the thread that built its arrays: the session closes everywhere
            self._done.set()

    def close(self) -> None:
        """End the request (the step under way finishes first) and free its slot."""
        self._stop.set()
        if self._started:
            self._done.wait()
        self._ticket.release()  # also when the events were never started


def speculation_usage(plan: SpeculationPlan, stats: GenerationStats,
                      session: BatchSession | None = None) -> dict[str, Any]:
    """`usage.speculative` of a response: what was drafted, accepted, what it cost, and the
    batches it ran in (`yielded_steps`: steps that drafted less for the batch's sake); `tree`
    only when the request verified token trees."""
    batch = None
    if session is not None:
        batch = {"passes": session.passes,
                 "mean_sessions": round(session.batched_with / session.passes, 3) if session.passes else 0.0}
    return {
        "enabled": plan.speculating, "strategy": plan.strategy, "window_policy": plan.policy.kind,
        "reason": plan.reason, "tokens": stats.tokens, "drafted": stats.drafted, "accepted": stats.accepted,
        "accept_rate": round(stats.accept_rate, 4), "target_passes": stats.target_passes,
        "tokens_per_pass": round(stats.tokens_per_pass, 4),
        "draft_seconds": round(stats.draft_seconds, 6), "verify_seconds": round(stats.verify_seconds, 6),
        "overlap": plan.overlap, "run_ahead": plan.run_ahead,
        "overlap_draft_seconds": round(stats.overlap_draft_seconds, 6),
        "overlap_hits": stats.overlap_hits, "overlap_misses": stats.overlap_misses,
        "windows": compress_windows(stats.windows), "yielded_steps": stats.yielded_steps, "batch": batch,
        **tree_usage(plan, stats),
    }


def tree_usage(plan: SpeculationPlan, stats: GenerationStats) -> dict[str, Any]:
    """`usage.speculative.tree`: the tree setting, nodes sent, accepted path lengths and
    acceptance by depth; empty when the request verified no tree."""
    if plan.tree is None or not stats.tree_steps:
        return {}
    return {"tree": {
        "policy": plan.tree.kind, "steps": stats.tree_steps, "nodes": stats.drafted,
        "nodes_per_step": round(stats.drafted / stats.tree_steps, 3),
        "path_per_step": round(sum(stats.tree_paths) / stats.tree_steps, 3),
        "paths": compress_windows(stats.tree_paths),
        "depths_drafted": stats.tree_depths_drafted, "depths_accepted": stats.tree_depths_accepted,
        "accept_rate_by_depth": [round(r, 4) for r in stats.accept_rate_by_depth]}}
