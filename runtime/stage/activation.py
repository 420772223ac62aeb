"""The activation path of one stage: run a frame through its layers, relay it downstream.

Each request (session) has its own Forward stream through the chain, opened by
stage 0; a stage opens the matching stream to its downstream peer. The last
stage's hidden states travel back up the same streams.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc

from layerline.errors import StageUnavailableError
from layerline.proto import activation_pb2 as pb
from layerline.proto import activation_pb2_grpc as pb_grpc

from .deadlines import Deadlines, FrameBudget
from .grpc_options import CLIENT_OPTIONS
from .node import LoadedStage, StageNode
from .wire import FrameError, decode, encode

log = logging.getLogger("layerline.stage")

_END = object()


class FrameTimeoutError(StageUnavailableError):
    """A downstream stage did not answer a frame within its budget."""


class FrameStream:
    """A lockstep request/response Forward stream to one peer: send a frame, read its answer.

    Every frame has a deadline (`budget`); a peer that does not answer in time has its
    stream cancelled and the call raises FrameTimeoutError.
    """

    def __init__(self, endpoint: str, *, deadlines: Deadlines, budget: FrameBudget,
                 metadata: list[tuple[str, str]] | None = None) -> None:
        self.endpoint = endpoint
        self._deadlines = deadlines
        self._budget = budget
        self._channel = grpc.insecure_channel(endpoint, options=CLIENT_OPTIONS)
        self._requests: queue.Queue[Any] = queue.Queue()
        stub = pb_grpc.StageActivationStub(self._channel)
        self._responses = stub.Forward(iter(self._requests.get, _END), metadata=metadata,
                                       timeout=None, wait_for_ready=False)
        self._expired = False

    def call(self, frame: pb.ActivationFrame) -> pb.ActivationFrame:
        """Send one frame and return the peer's answer; raises grpc.RpcError if the peer is gone."""
        positions = frame.activations.token_count if frame.WhichOneof("body") == "activations" else 1
        budget = self._budget.seconds(positions)
        started = time.monotonic()
        handle = self._deadlines.arm(budget, self._expire)
        try:
            self._requests.put(frame)
            answer = next(self._responses)
        except grpc.RpcError as exc:
            if self._expired:
                raise FrameTimeoutError(
                    f"{self.endpoint} did not answer a frame of {positions} positions within "
                    f"{budget:.1f} s", hint="check that stage; stage 0 marks it down") from exc
            raise
        finally:
            self._deadlines.clear(handle)
        self._budget.record(positions, time.monotonic() - started)
        return answer

    def _expire(self) -> None:
        self._expired = True
        self._responses.cancel()

    def close(self) -> None:
        self._requests.put(_END)
        handle = self._deadlines.arm(self._budget.base_s, self._responses.cancel)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass
        finally:
            self._deadlines.clear(handle)
        self._channel.close()


def _error(frame: pb.ActivationFrame, code: int, message: str, stage_index: int) -> pb.ActivationFrame:
    return pb.ActivationFrame(session_id=frame.session_id, seq=frame.seq,
                              error=pb.ActivationError(code=code, message=message,
                                                       stage_index=stage_index))


class ActivationRelay:
    """Serves one upstream Forward stream for a StageNode."""

    def __init__(self, node: StageNode, deadlines: Deadlines,
                 metadata: list[tuple[str, str]] | None = None) -> None:
        self.node = node
        self.deadlines = deadlines
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
            # Without a live stream downstream the session is gone there already (a closed
            # stream drops its sessions): do not open one only to say so.
            return self._relay(loaded, frame) if self.downstream is not None else frame
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
                self.downstream = FrameStream(loaded.options.downstream, deadlines=self.deadlines,
                                              budget=loaded.downstream_budget, metadata=self.metadata)
            return self.downstream.call(frame)
        except (grpc.RpcError, StopIteration, FrameTimeoutError) as exc:
            self.downstream = None
            detail = stream_failure(exc)
            log.error("stage=%d event=downstream_failed peer=%s error=%s", index,
                      loaded.options.downstream, detail)
            return _error(frame, pb.ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE,
                          f"stage {index + 1} at {loaded.options.downstream} is unavailable: {detail}",
                          index)


def stream_failure(exc: BaseException) -> str:
    """What went wrong on a Forward stream, in a few words."""
    if isinstance(exc, FrameTimeoutError):
        return exc.message
    if isinstance(exc, grpc.RpcError):
        return exc.details() or exc.code().name
    return "stream ended"
