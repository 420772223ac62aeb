"""The activation path of one stage: run a batch frame through its layers, relay it downstream.

Stage 0 opens one activation connection per lane of its scheduler, each carrying batch
frames of many sessions (and their session ends); a stage opens the matching connection to
its downstream peer. The last stage's hidden states travel back up the same connections,
and every stage adds its StageTiming.
"""

from __future__ import annotations

import logging
import time

from google.protobuf.unknown_fields import UnknownFieldSet

from layerline.errors import StageUnavailableError
from layerline.proto import activation_pb2 as pb

from .frame_transport import FrameConnection
from .node import LoadedStage, StageNode
from .wire import FrameError, decode_batch, encode_batch

log = logging.getLogger("layerline.stage")

# ActivationFrame's retired single-session body, now reserved: older stage 0s still send it.
_SINGLE_SESSION_BODY = 3


def _carries_single_session_body(frame: pb.ActivationFrame) -> bool:
    """Whether a frame holds the single-session body older stage 0s send (an unknown field now)."""
    return any(field.field_number == _SINGLE_SESSION_BODY for field in UnknownFieldSet(frame))


def _error(frame: pb.ActivationFrame, code: int, message: str, stage_index: int) -> pb.ActivationFrame:
    return pb.ActivationFrame(session_id=frame.session_id, seq=frame.seq,
                              error=pb.ActivationError(code=code, message=message,
                                                       stage_index=stage_index))


class ActivationRelay:
    """Serves one upstream activation connection for a StageNode."""

    def __init__(self, node: StageNode) -> None:
        self.node = node
        self.downstream: FrameConnection | None = None
        self.sessions: set[str] = set()

    def close(self) -> None:
        """The upstream connection ended: drop its sessions here and close the one downstream."""
        loaded = self.node.loaded
        for session in self.sessions:
            if loaded is not None:
                loaded.model.drop_session(session)
        if self.downstream is not None:
            self.downstream.close()

    def answer(self, frame: pb.ActivationFrame) -> pb.ActivationFrame:
        """The answer to one request frame: a batch's hidden states, a session end, or an error."""
        loaded = self.node.serving()
        index = loaded.options.stage_index if loaded else 0
        if loaded is None:
            return _error(frame, pb.ACTIVATION_ERROR_CODE_NOT_READY,
                          f"stage {self.node.endpoint} has no model loaded", index)
        kind = frame.WhichOneof("body")
        if kind == "end_session":
            if frame.session_id not in self.sessions:
                return frame  # not a session of this connection: another's is not its to end
            loaded.model.drop_session(frame.session_id)
            self.sessions.discard(frame.session_id)
            # Without a live connection downstream the session is gone there already (a closed
            # connection drops its sessions): do not open one only to say so.
            return self._relay(loaded, frame) if self.downstream is not None else frame
        if kind == "batch":
            return self._compute(loaded, frame, index)
        if _carries_single_session_body(frame):
            return _error(frame, pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                          f"stage {index} takes one session's activations only inside a batch frame: "
                          "stage 0 runs an older layerline; update it", index)
        return _error(frame, pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                      "a request frame needs a batch or end_session", index)

    def _compute(self, loaded: LoadedStage, frame: pb.ActivationFrame, index: int) -> pb.ActivationFrame:
        """Run a batch frame's rows through this stage's layers, relay it downstream, and add
        this stage's timing to the answer."""
        received = time.perf_counter_ns()
        try:
            rows, hidden = decode_batch(frame.batch, loaded.limits)
            with self.node.compute_lock:
                computing = time.perf_counter_ns()
                out = loaded.model.forward_batch(rows, hidden)
                computed = time.perf_counter_ns()
        except FrameError as exc:
            return _error(frame, exc.code, f"stage {index}: {exc.message}", index)
        self.sessions.update(r.session_id for r in rows)
        dtype = frame.batch.activations.dtype
        answer = pb.ActivationFrame(seq=frame.seq, batch=encode_batch(out, rows, dtype))
        downstream_ns = 0
        if loaded.downstream is not None:
            sent = time.perf_counter_ns()
            answer = self._relay(loaded, answer)
            downstream_ns = time.perf_counter_ns() - sent
        answer.timings.append(pb.StageTiming(
            stage_index=index, total_ns=time.perf_counter_ns() - received,
            compute_ns=computed - computing, downstream_ns=downstream_ns))
        return answer

    def _relay(self, loaded: LoadedStage, frame: pb.ActivationFrame) -> pb.ActivationFrame:
        index = loaded.options.stage_index
        assert loaded.downstream is not None
        try:
            if self.downstream is None:
                self.downstream = FrameConnection(loaded.downstream.get(), budget=loaded.downstream_budget,
                                                  token=self.node.token)
            return self.downstream.call(frame)
        except StageUnavailableError as exc:
            loaded.downstream.forget()  # it may have restarted on another port: ask it again next time
            self.downstream = None
            log.error("stage=%d event=downstream_failed peer=%s error=%s", index,
                      loaded.options.downstream, exc.message)
            return _error(frame, pb.ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE,
                          f"stage {index + 1} at {loaded.options.downstream} is unavailable: {exc.message}",
                          index)
