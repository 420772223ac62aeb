"""The activation path of one stage: run a frame through its layers, relay it downstream.

Each request (session) has its own activation connection through the chain, opened by
stage 0; a stage opens the matching connection to its downstream peer. The last stage's
hidden states travel back up the same connections, and every stage adds its StageTiming.
"""

from __future__ import annotations

import logging
import time

from layerline.errors import StageUnavailableError
from layerline.proto import activation_pb2 as pb

from .frame_transport import FrameConnection
from .node import LoadedStage, StageNode
from .wire import FrameError, Rows, decode, decode_batch, encode, encode_batch

log = logging.getLogger("layerline.stage")


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
        loaded = self.node.serving()
        index = loaded.options.stage_index if loaded else 0
        if loaded is None:
            return _error(frame, pb.ACTIVATION_ERROR_CODE_NOT_READY,
                          f"stage {self.node.endpoint} has no model loaded", index)
        kind = frame.WhichOneof("body")
        if kind == "end_session":
            loaded.model.drop_session(frame.session_id)
            self.sessions.discard(frame.session_id)
            # Without a live connection downstream the session is gone there already (a closed
            # connection drops its sessions): do not open one only to say so.
            return self._relay(loaded, frame) if self.downstream is not None else frame
        if kind == "batch":
            return self._compute(loaded, frame, index)
        if kind != "activations" or not frame.session_id:
            return _error(frame, pb.ACTIVATION_ERROR_CODE_BAD_FRAME,
                          "a request frame needs a session_id and activations, a batch or end_session",
                          index)
        return self._compute(loaded, frame, index)

    def _compute(self, loaded: LoadedStage, frame: pb.ActivationFrame, index: int) -> pb.ActivationFrame:
        """Run a frame (one session's positions, or a batch of several sessions' rows) through
        this stage's layers, relay it downstream, and add this stage's timing to the answer."""
        received = time.perf_counter_ns()
        try:
            if frame.WhichOneof("body") == "batch":
                rows, hidden = decode_batch(frame.batch, loaded.limits)
                dtype = frame.batch.activations.dtype
            else:
                rows = [Rows(frame.session_id, frame.activations.start_pos, frame.activations.token_count)]
                hidden, dtype = decode(frame.activations, loaded.limits), frame.activations.dtype
            with self.node.compute_lock:
                computing = time.perf_counter_ns()
                out = loaded.model.forward_batch(rows, hidden)
                computed = time.perf_counter_ns()
        except FrameError as exc:
            return _error(frame, exc.code, f"stage {index}: {exc.message}", index)
        self.sessions.update(r.session_id for r in rows)
        if frame.WhichOneof("body") == "batch":
            outgoing = pb.ActivationFrame(seq=frame.seq, batch=encode_batch(out, rows, dtype))
        else:
            outgoing = pb.ActivationFrame(session_id=frame.session_id, seq=frame.seq,
                                          activations=encode(out, frame.activations.start_pos, dtype))
        answer = outgoing
        downstream_ns = 0
        if loaded.downstream is not None:
            sent = time.perf_counter_ns()
            answer = self._relay(loaded, outgoing)
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
