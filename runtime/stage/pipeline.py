"""Stage 0's forward pass over the split pipeline: embed, own layers, remote stages, head,
and where each pass's time went (`PassTrace`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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

    def to_json(self) -> dict:
        return {"positions": self.positions, "total_s": round(self.total_s, 6),
                "local_s": round(self.local_s, 6), "head_s": round(self.head_s, 6),
                "stage_compute_s": {str(k): round(v, 6) for k, v in sorted(self.stage_compute_s.items())},
                "hops_s": [round(h, 6) for h in self.hops_s]}


class PipelineSession:
    """One request's path through the pipeline: its KV caches on every stage, one connection."""

    def __init__(self, pipeline: Pipeline, session_id: str) -> None:
        self.pipeline = pipeline
        self.session_id = session_id
        self._connection: FrameConnection | None = None
        self._seq = 0
        self.last_trace: PassTrace | None = None

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` placed at absolute positions start_pos.. on every stage."""
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
        if p.first_peer is not None:
            h = self._remote(h, start_pos, trace)
        head_started = time.perf_counter()
        with p.compute_lock:
            logits = p.head.logits(h)[0]
            mx.eval(logits)
        done = time.perf_counter()
        trace.head_s, trace.total_s = done - head_started, done - started
        self.last_trace = trace
        p.record(trace)
        return logits

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

    def _remote(self, h: mx.array, start_pos: int, trace: PassTrace) -> mx.array:
        p = self.pipeline
        assert p.first_peer is not None
        self._seq += 1
        sent = time.perf_counter()
        frame = pb.ActivationFrame(session_id=self.session_id, seq=self._seq,
                                   activations=encode(h, start_pos, p.wire_dtype))
        try:
            if self._connection is None:
                self._connection = self._connect()
            answer = self._connection.call(frame)
        except StageUnavailableError as exc:
            self._connection = None
            p.first_peer.forget()  # it may have restarted on another port
            p.on_stage_error(1, exc.message)
            raise StageUnavailableError(f"stage 1 at {p.first_peer.control_endpoint} is unavailable: "
                                        f"{exc.message}",
                                        hint="restart that stage; stage 0 will reload it") from exc
        if answer.WhichOneof("body") == "error":
            error = answer.error
            if error.code == pb.ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE:
                p.on_stage_error(error.stage_index + 1, error.message)
            raise StageUnavailableError(error.message)
        hidden = decode(answer.activations, p.limits).astype(p.compute_dtype)
        waited = time.perf_counter() - sent
        # Timings come back last stage first. A hop is all of a stage's wait for the next one that
        # the next one did not spend computing or waiting further: the wire both ways and the
        # (de)serialization at both ends, so the parts add up to the pass.
        timings = sorted(answer.timings, key=lambda t: t.stage_index)
        waits = [waited, *(t.downstream_ns / 1e9 for t in timings)]
        for i, timing in enumerate(timings):
            trace.stage_compute_s[timing.stage_index] = timing.compute_ns / 1e9
            trace.hops_s.append(max(0.0, waits[i] - (timing.compute_ns + timing.downstream_ns) / 1e9))
        return hidden

    def close(self) -> None:
        """Drop the session's caches here and on every stage."""
        p = self.pipeline
        if p.local is not None:
            p.local.drop_session(self.session_id)
        if self._connection is not None:
            self._seq += 1
            try:
                self._connection.call(pb.ActivationFrame(session_id=self.session_id, seq=self._seq,
                                                         end_session=pb.EndSession()))
            except StageUnavailableError:
                pass  # a dead stage lost the session anyway
            self._connection.close()
            self._connection = None


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
