"""Stage 0's forward pass over the split pipeline: embed, own layers, remote stages, head,
and where each pass's time went (`PassTrace`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx

from layerline.errors import LayerlineError, StageUnavailableError
from layerline.proto import activation_pb2 as pb

from ..model.head import Head
from .client import ActivationAddress
from .frame_budget import DEFAULT_FRAME_TIMEOUT_S, FrameBudget
from .frame_transport import FrameConnection
from .model import StageModel
from .wire import FrameLimits, decode, encode

log = logging.getLogger("layerline.pipeline")


@dataclass
class PassTrace:
    """Where one target pass's time went, in seconds.

    `hops[i]` is the link from stage i to stage i+1 both ways: wire, (de)serialization and
    queueing, i.e. stage i's wait for stage i+1 less everything stage i+1 reported.
    """

    positions: int
    local_s: float = 0.0  # stage 0: embedding and its own layers
    head_s: float = 0.0  # stage 0: final norm and output head
    stage_compute_s: dict[int, float] = field(default_factory=dict)  # stage index -> its layers
    hops_s: list[float] = field(default_factory=list)
    total_s: float = 0.0
    queue_s: float = 0.0  # stage 0: waiting for the batch pass to start and hand the logits over
    sessions: int = 1  # sessions whose rows the pass carried

    def add_timings(self, answer: pb.ActivationFrame, waited: float) -> None:
        """Each stage's compute and each hop's time, from the timings an answer carries, `waited`
        seconds after its frame was sent.

        Timings come back last stage first. A hop is all of a stage's wait for the next one that
        the next one did not spend computing or waiting further: the wire both ways and the
        (de)serialization at both ends, so the parts add up to the pass."""
        timings = sorted(answer.timings, key=lambda t: t.stage_index)
        waits = [waited, *(t.downstream_ns / 1e9 for t in timings)]
        for i, timing in enumerate(timings):
            self.stage_compute_s[timing.stage_index] = timing.compute_ns / 1e9
            self.hops_s.append(max(0.0, waits[i] - (timing.compute_ns + timing.downstream_ns) / 1e9))

    def to_json(self) -> dict:
        return {"positions": self.positions, "total_s": round(self.total_s, 6),
                "queue_s": round(self.queue_s, 6), "sessions": self.sessions,
                "local_s": round(self.local_s, 6), "head_s": round(self.head_s, 6),
                "stage_compute_s": {str(k): round(v, 6) for k, v in sorted(self.stage_compute_s.items())},
                "hops_s": [round(h, 6) for h in self.hops_s]}


class PipelineSession:
    """One request's path through the pipeline: its KV caches on every stage, one connection.

    A pass is sent (`submit`) and its logits read later (`PendingPass.result`), so stage 0 can
    draft while the other stages verify. Several passes may be in flight (run-ahead); their
    answers come back in order, and a pass given up (`PendingPass.discard`) has its answer
    read and dropped: a stage may not even run it (`superseded`).
    """

    def __init__(self, pipeline: Pipeline, session_id: str) -> None:
        self.pipeline = pipeline
        self.session_id = session_id
        self._connection: FrameConnection | None = None
        self._seq = 0
        self._in_flight: deque[PendingPass] = deque()  # sent, answer not read yet, oldest first
        self.last_trace: PassTrace | None = None

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` placed at absolute positions start_pos.. on every stage."""
        return self.submit(tokens, start_pos).result()

    def submit(self, tokens: list[int], start_pos: int) -> PendingPass:
        """Run stage 0's layers on `tokens` and send them on; the logits come from `.result()`."""
        p = self.pipeline
        p.check_tokens(tokens)
        started = time.perf_counter()
        trace = PassTrace(len(tokens))
        # Local compute is serialized; waiting on the remote stages is not, so requests overlap.
        with p.compute_lock:
            h = p.head.embed(mx.array([tokens]))
            if p.local is not None:
                h = p.local.forward(self.session_id, start_pos, h)
            else:
                mx.eval(h)
        trace.local_s = time.perf_counter() - started
        pending = PendingPass(self, start_pos, trace, started)
        if p.first_peer is None:
            pending.hidden = h
        else:
            self._send(h, start_pos, pending)
            self._in_flight.append(pending)
        return pending

    def _connect(self) -> FrameConnection:
        """A connection to stage 1; asked anew where it listens if the address known fails to
        connect (a restarted stage listens on another port). Nothing was sent yet: safe to retry."""
        p = self.pipeline
        assert p.first_peer is not None
        try:
            return FrameConnection(p.first_peer.get(), budget=p.budget, token=p.token)
        except StageUnavailableError:
            p.first_peer.forget()
            return FrameConnection(p.first_peer.get(), budget=p.budget, token=p.token)

    def _send(self, h: mx.array, start_pos: int, pending: PendingPass) -> None:
        p = self.pipeline
        self._seq += 1
        frame = pb.ActivationFrame(session_id=self.session_id, seq=self._seq,
                                   activations=encode(h, start_pos, p.wire_dtype))
        with self._stage_errors():
            if self._connection is None:
                self._connection = self._connect()
            pending.sent = time.perf_counter()
            self._connection.send(frame)

    @contextmanager
    def _stage_errors(self) -> Iterator[None]:
        """Turn a broken connection to stage 1 into a StageUnavailableError that names it."""
        p = self.pipeline
        assert p.first_peer is not None
        try:
            yield
        except StageUnavailableError as exc:
            self._connection = None
            self._in_flight.clear()
            p.first_peer.forget()  # it may have restarted on another port
            p.on_stage_error(1, exc.message)
            raise StageUnavailableError(f"stage 1 at {p.first_peer.control_endpoint} is unavailable: "
                                        f"{exc.message}",
                                        hint="restart that stage; stage 0 will reload it") from exc

    def _collect(self, wanted: PendingPass) -> mx.array:
        """Read answers in order up to `wanted`'s; the logits of `wanted`."""
        p = self.pipeline
        if wanted.hidden is None:
            while True:
                if not self._in_flight or self._connection is None:
                    raise StageUnavailableError("the pass was lost: its connection to stage 1 ended",
                                                hint="send the request again")
                oldest = self._in_flight.popleft()
                with self._stage_errors():
                    answer = self._connection.receive()
                oldest.take(answer)
                if oldest is wanted:
                    break
        head_started = time.perf_counter()
        with p.compute_lock:
            logits = p.head.logits(wanted.hidden)[0]
            mx.eval(logits)
        done = time.perf_counter()
        trace = wanted.trace
        trace.head_s, trace.total_s = done - head_started, done - wanted.started
        self.last_trace = trace
        p.record(trace)
        return logits

    def _answer_waiting(self) -> bool:
        connection = self._connection
        return connection is None or connection.readable()

    def close(self) -> None:
        """Drop the session's caches here and on every stage."""
        p = self.pipeline
        if p.local is not None:
            p.local.drop_session(self.session_id)
        if self._connection is not None:
            if self._in_flight:
                # A pass is still out (a request closed mid-run-ahead): ending the connection
                # drops the session on every stage without waiting for its answer.
                self._in_flight.clear()
            else:
                self._seq += 1
                try:
                    self._connection.call(pb.ActivationFrame(session_id=self.session_id, seq=self._seq,
                                                             end_session=pb.EndSession()))
                except StageUnavailableError:
                    pass  # a dead stage lost the session anyway
            self._connection.close()
            self._connection = None


class PendingPass:
    """A target pass sent into the pipeline whose logits are not read yet."""

    def __init__(self, session: PipelineSession, start_pos: int, trace: PassTrace, started: float) -> None:
        self.session = session
        self.start_pos = start_pos
        self.trace = trace
        self.started = started
        self.sent = started
        self.hidden: mx.array | None = None  # the last stage's hidden states, once answered
        self.discarded = False

    def result(self) -> mx.array:
        """Logits (L, vocab) of the pass: waits for its answer (and those sent before it)."""
        if self.discarded:
            raise RuntimeError("this pass was discarded")
        return self.session._collect(self)

    def discard(self) -> None:
        """Give the pass up: its answer is read and dropped with the next pass's."""
        self.discarded = True

    def ready(self) -> bool:
        """Whether an answer is waiting to be read (this pass's, or one before it)."""
        return self.hidden is not None or self.session._answer_waiting()

    def take(self, answer: pb.ActivationFrame) -> None:
        """Keep the answer to this pass (or drop it, for a discarded pass)."""
        p = self.session.pipeline
        kind = answer.WhichOneof("body")
        if kind == "error":
            error = answer.error
            if error.code == pb.ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE:
                p.on_stage_error(error.stage_index + 1, error.message)
            if not self.discarded or error.code == pb.ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE:
                raise StageUnavailableError(error.message)
            return
        if self.discarded:
            return
        if kind != "activations":
            raise StageUnavailableError(f"stage 1 answered a pass at position {self.start_pos} with "
                                        f"{kind or 'nothing'} instead of activations",
                                        hint="stage 0 sent a frame that overtook it; report this bug")
        self.hidden = decode(answer.activations, p.limits).astype(p.compute_dtype)
        # While stage 0 drafts during the pass, an answer that waits to be read counts in hop 0→1.
        self.trace.add_timings(answer, time.perf_counter() - self.sent)


class Pipeline:
    def __init__(self, head: Head, local: StageModel | None, *, first_peer: str | None,
                 wire_dtype: int, hidden_size: int, max_tokens: int, token: str | None = None,
                 on_stage_error: Callable[[int, str], None] | None = None,
                 frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S,
                 on_pass: Callable[[PassTrace], None] | None = None) -> None:
        self.head = head
        self.local = local
        # Stage 1's activation endpoint, asked of its control endpoint `first_peer`.
        self.first_peer = ActivationAddress(first_peer, token) if first_peer else None
        self.token = token
        self.wire_dtype = wire_dtype
        self.limits = FrameLimits(hidden_size, max_tokens)
        self.compute_dtype = local.compute_dtype if local is not None else mx.float32
        self.on_stage_error = on_stage_error or (lambda index, message: None)
        self.compute_lock = threading.Lock()
        self.budget = FrameBudget(frame_timeout_s)  # what stage 1 (and all after it) may take
        self._on_pass = on_pass

    def open(self, session_id: str) -> PipelineSession:
        return PipelineSession(self, session_id)

    def record(self, trace: PassTrace) -> None:
        if self._on_pass is not None:
            self._on_pass(trace)

    def check_tokens(self, tokens: list[int]) -> None:
        """Refuse token ids the embedding has no row for (reading past it would crash)."""
        vocab = self.head.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise LayerlineError(f"token id {bad} is outside the vocabulary (0 to {vocab - 1})",
                                 hint="send token ids the model's tokenizer produced")
