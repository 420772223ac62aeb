"""The activation path of one stage: run a frame through its layers, relay it downstream.

Each request (session) has its own Forward stream through the chain, opened by
stage 0; a stage opens the matching stream to its downstream peer. The last
stage's hidden states travel back up the same streams.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from typing import Any

import grpc

from layerline.proto import activation_pb2 as pb
from layerline.proto import activation_pb2_grpc as pb_grpc

from .node import LoadedStage, StageNode
from .wire import FrameError, decode, encode

log = logging.getLogger("layerline.stage")

MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_END = object()


class FrameStream:
    """A lockstep request/response Forward stream to one peer: send a frame, read its answer."""

    def __init__(self, endpoint: str, *, metadata: list[tuple[str, str]] | None = None,
                 timeout_s: float = 120.0) -> None:
        self.endpoint = endpoint
        self._channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self._requests: queue.Queue[Any] = queue.Queue()
        stub = pb_grpc.StageActivationStub(self._channel)
        self._responses = stub.Forward(iter(self._requests.get, _END), metadata=metadata,
                                       timeout=None, wait_for_ready=False)
        self._timeout_s = timeout_s

    def call(self, frame: pb.ActivationFrame) -> pb.ActivationFrame:
        """Send one frame and return the peer's answer; raises grpc.RpcError if the peer is gone."""
        self._requests.put(frame)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(_END)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass
        self._channel.close()


def _error(frame: pb.ActivationFrame, code: int, message: str, stage_index: int) -> pb.ActivationFrame:
    return pb.ActivationFrame(session_id=frame.session_id, seq=frame.seq,
                              error=pb.ActivationError(code=code, message=message,
                                                       stage_index=stage_index))


class ActivationRelay:
    """Serves one upstream Forward stream for a StageNode."""

    def __init__(self, node: StageNode, metadata: list[tuple[str, str]] | None = None) -> None:
        self.node = node
        self.metadata = metadata
        self.downstream: FrameStream | None = None
        self.sessions: set[str] = set()

    def serve(self, frames: Iterator[pb.ActivationFrame]) -> Iterator[pb.ActivationFrame]:
        try:
            for frame in frames:
                yield self.answer(frame)
        finally:
            self._close()

    def _close(self) -> None:
        loaded = self.node.loaded
        for session in self.sessions:
            if loaded is not None:
                loaded.model.drop_session(session)
        if self.downstream is not None:
            self.downstream.close()

    def answer(self, frame: pb.ActivationFrame) -> pb.ActivationFrame:
        loaded = self.node.serving()
        index = loaded.options.stage_index if loaded else 0
        if loaded is None:
            return _error(frame, pb.ACTIVATION_ERROR_CODE_NOT_READY,
                          f"stage {self.node.endpoint} has no model loaded", index)
        kind = frame.WhichOneof("body")
        if kind == "end_session":
            loaded.model.drop_session(frame.session_id)
            self.sessions.discard(frame.session_id)
            return self._relay(loaded, frame) if loaded.options.downstream else frame
        if kind != "activations" or not frame.session_id:
            return _error(frame, pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                          "a request frame needs a session_id and activations or end_session", index)
        try:
            hidden = decode(frame.activations, loaded.limits)
            with self.node.compute_lock:
                out = loaded.model.forward(frame.session_id, frame.activations.start_pos, hidden)
        except FrameError as exc:
            return _error(frame, exc.code, f"stage {index}: {exc.message}", index)
        self.sessions.add(frame.session_id)
        outgoing = pb.ActivationFrame(
            session_id=frame.session_id, seq=frame.seq,
            activations=encode(out, frame.activations.start_pos, frame.activations.dtype))
        if not loaded.options.downstream:
            return outgoing
        return self._relay(loaded, outgoing)

    def _relay(self, loaded: LoadedStage, frame: pb.ActivationFrame) -> pb.ActivationFrame:
        index = loaded.options.stage_index
        try:
            if self.downstream is None:
                self.downstream = FrameStream(loaded.options.downstream, metadata=self.metadata)
            return self.downstream.call(frame)
        except (grpc.RpcError, StopIteration) as exc:
            self.downstream = None
            detail = exc.details() if isinstance(exc, grpc.RpcError) else "stream ended"
            log.error("stage=%d event=downstream_failed peer=%s error=%s", index,
                      loaded.options.downstream, detail)
            return _error(frame, pb.ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE,
                          f"stage {index + 1} at {loaded.options.downstream} is unavailable: {detail}",
                          index)
