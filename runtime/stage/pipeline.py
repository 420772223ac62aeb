"""Stage 0's forward pass over the split pipeline: embed, own layers, remote stages, head."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc
import mlx.core as mx

from layerline.errors import LayerlineError, StageUnavailableError
from layerline.proto import activation_pb2 as pb

from ..model.head import Head
from .activation import FrameStream, FrameTimeoutError, stream_failure
from .deadlines import DEFAULT_FRAME_TIMEOUT_S, Deadlines, FrameBudget
from .model import StageModel
from .wire import FrameLimits, decode, encode

log = logging.getLogger("layerline.pipeline")


class PipelineSession:
    """One request's path through the pipeline: its KV caches on every stage, one stream."""

    def __init__(self, pipeline: Pipeline, session_id: str) -> None:
        self.pipeline = pipeline
        self.session_id = session_id
        self._stream: FrameStream | None = None
        self._seq = 0

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` placed at absolute positions start_pos.. on every stage."""
        p = self.pipeline
        p.check_tokens(tokens)
        # Local compute is serialized; waiting on the remote stages is not, so requests overlap.
        with p.compute_lock:
            h = p.head.embed(mx.array([tokens]))
            if p.local is not None:
                h = p.local.forward(self.session_id, start_pos, h)
        if p.first_peer:
            h = self._remote(h, start_pos)
        with p.compute_lock:
            logits = p.head.logits(h)[0]
            mx.eval(logits)
        return logits

    def _remote(self, h: mx.array, start_pos: int) -> mx.array:
        p = self.pipeline
        self._seq += 1
        frame = pb.ActivationFrame(session_id=self.session_id, seq=self._seq,
                                   activations=encode(h, start_pos, p.wire_dtype))
        try:
            if self._stream is None:
                self._stream = FrameStream(p.first_peer, deadlines=p.deadlines, budget=p.budget,
                                           metadata=p.metadata)
            answer = self._stream.call(frame)
        except (grpc.RpcError, StopIteration, FrameTimeoutError) as exc:
            self._stream = None
            detail = stream_failure(exc)
            p.on_stage_error(1, detail)
            raise StageUnavailableError(f"stage 1 at {p.first_peer} is unavailable: {detail}",
                                        hint="restart that stage; stage 0 will reload it") from exc
        if answer.WhichOneof("body") == "error":
            error = answer.error
            if error.code == pb.ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE:
                p.on_stage_error(error.stage_index + 1, error.message)
            raise StageUnavailableError(error.message)
        return decode(answer.activations, p.limits).astype(p.compute_dtype)

    def close(self) -> None:
        """Drop the session's caches here and on every stage."""
        p = self.pipeline
        if p.local is not None:
            p.local.drop_session(self.session_id)
        if self._stream is not None:
            self._seq += 1
            try:
                self._stream.call(pb.ActivationFrame(session_id=self.session_id, seq=self._seq,
                                                     end_session=pb.EndSession()))
            except (grpc.RpcError, StopIteration, FrameTimeoutError):
                pass  # a dead stage lost the session anyway
            self._stream.close()
            self._stream = None


class Pipeline:
    def __init__(self, head: Head, local: StageModel | None, *, first_peer: str | None,
                 wire_dtype: int, hidden_size: int, max_tokens: int,
                 metadata: list[tuple[str, str]] | None = None,
                 on_stage_error: Callable[[int, str], None] | None = None,
                 frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S) -> None:
        self.head = head
        self.local = local
        self.first_peer = first_peer
        self.wire_dtype = wire_dtype
        self.metadata = metadata
        self.limits = FrameLimits(hidden_size, max_tokens)
        self.compute_dtype = local.compute_dtype if local is not None else mx.float32
        self.on_stage_error = on_stage_error or (lambda index, message: None)
        self.compute_lock = threading.Lock()
        self.deadlines = Deadlines()
        self.budget = FrameBudget(frame_timeout_s)  # what stage 1 (and all after it) may take

    def open(self, session_id: str) -> PipelineSession:
        return PipelineSession(self, session_id)

    def check_tokens(self, tokens: list[int]) -> None:
        """Refuse token ids the embedding has no row for (reading past it would crash)."""
        vocab = self.head.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise LayerlineError(f"token id {bad} is outside the vocabulary (0 to {vocab - 1})",
                                 hint="send token ids the model's tokenizer produced")
