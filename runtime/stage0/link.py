"""A lane's link to stage 1: its one connection, the batches and session ends it carries, and
the sessions whose caches a broken connection took away.

A connection kept from earlier passes may lead to a stage that has restarted since: a pass
none of whose sessions had rows on it runs anew on a new connection. Otherwise a broken
connection, or a stage that says the next is unavailable, fails the pass with a
`StageLostError` naming the stage; without a failover the sessions it carried are lost: their
requests are refused (send them again) until they end. With one, the lane `relink`s once the
stage is replaced and replays them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import mlx.core as mx

from layerline.errors import StageUnavailableError
from layerline.proto import activation_pb2 as pb

from ..stage.client import ActivationAddress
from ..stage.frame_transport import FrameConnection
from ..stage.wire import Rows, decode_batch, encode_batch
from .pipeline import PassTrace, Pipeline


class StageLostError(StageUnavailableError):
    """A pass failed because stage `stage_index` is down or stopped answering."""

    def __init__(self, stage_index: int, message: str, hint: str) -> None:
        super().__init__(message, hint=hint)
        self.stage_index = stage_index


class Link:
    """One lane's connection to stage 1 (and through it every later stage), reconnected as needed."""

    def __init__(self, pipeline: Pipeline, peer: ActivationAddress) -> None:
        self._pipeline = pipeline
        self._peer = peer
        self._lock = threading.Lock()  # guards `_lost`, which the requests' threads read
        self._lost: set[str] = set()  # sessions whose caches a broken connection took away
        self._carried: set[str] = set()  # sessions with rows sent on the current connection
        self._connection: FrameConnection | None = None
        self._seq = 0

    def lost(self, session_id: str) -> bool:
        """Whether the session's caches on the other stages were lost with a broken connection."""
        with self._lock:
            return session_id in self._lost

    def end(self, session_ids: Sequence[str]) -> None:
        """End sessions on every stage, in a pass that carries no rows."""
        ends = self._ends(session_ids)
        if not ends or self._connection is None:
            return  # without a connection the sessions are gone from the stages already
        try:
            for end in ends:
                self._connection.send(end)
            for _ in ends:
                self._connection.receive()
        except StageUnavailableError:
            self._broken()

    def send(self, h: mx.array, rows: list[Rows], trace: PassTrace, *,
             ending: Sequence[str] = ()) -> mx.array:
        """Send the ends of the `ending` sessions, then the batch `h` of `rows`, to stage 1; the last
        stage's hidden rows. Each stage's compute and each hop go into `trace`."""
        p = self._pipeline
        ends = self._ends(ending)
        sent = time.perf_counter()  # the hop counts the frame's encoding, as the stages' timings do not
        frame = pb.ActivationFrame(seq=self._next_seq(), batch=encode_batch(h, rows, p.wire_dtype))
        sessions = {r.session_id for r in rows}
        while True:
            # A connection kept from earlier passes may lead to a stage that has restarted since:
            # when no session of this pass had rows on it, the pass runs anew on a new one.
            retry = self._connection is not None and not sessions & self._carried
            try:
                answer = self._exchange(ends, frame, sessions)
                break
            except StageUnavailableError as exc:
                self._broken()
                if retry:
                    with self._lock:
                        self._lost -= sessions  # their first rows: sent again on the new connection
                    ends = []  # moot: the sessions they end were on the broken connection
                    continue
                p.on_stage_error(1, exc.message)
                raise StageLostError(1, f"stage 1 at {self._peer.control_endpoint} is unavailable: "
                                     f"{exc.message}",
                                     hint="restart that stage; stage 0 will reload it") from exc
        kind = answer.WhichOneof("body")
        if kind == "error":
            error = answer.error
            if error.code == pb.ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE:
                p.on_stage_error(error.stage_index + 1, error.message)
                raise StageLostError(error.stage_index + 1, error.message, hint="send the request again")
            raise StageUnavailableError(error.message, hint="send the request again")
        if kind != "batch":
            raise StageUnavailableError(f"stage 1 answered a batch with {kind or 'nothing'}",
                                        hint="stage 0 and stage 1 run different versions; update both")
        answered, hidden = decode_batch(answer.batch, p.limits)
        if answered != rows:
            raise StageUnavailableError("stage 1 answered a batch with other sessions' rows",
                                        hint="stage 0 and stage 1 run different versions; update both")
        trace.add_timings(answer, time.perf_counter() - sent)
        return hidden.astype(p.compute_dtype)

    def relink(self, peer: ActivationAddress) -> None:
        """Start over on a new connection to `peer` (stage 1 after a repair): every stage drops
        what the old one carried, and no session counts as lost (the lane replays them)."""
        self.close()
        self._connection = None
        self._peer = peer
        with self._lock:
            self._lost.clear()
        self._carried = set()

    def close(self) -> None:
        """Close the connection: every stage drops the sessions it carried."""
        if self._connection is not None:
            self._connection.close()

    def _ends(self, session_ids: Sequence[str]) -> list[pb.ActivationFrame]:
        """End frames for sessions that are over (none for the lost: gone from the stages already);
        the link forgets them."""
        with self._lock:
            ends = [pb.ActivationFrame(session_id=session_id, seq=self._next_seq(),
                                       end_session=pb.EndSession())
                    for session_id in session_ids if session_id not in self._lost]
            self._lost.difference_update(session_ids)
        self._carried.difference_update(session_ids)
        return ends

    def _exchange(self, ends: list[pb.ActivationFrame], frame: pb.ActivationFrame,
                  sessions: set[str]) -> pb.ActivationFrame:
        """Send session ends and a batch on the connection; the batch's answer."""
        connection = self._connect()
        for end in ends:
            connection.send(end)
        connection.send(frame)
        self._carried |= sessions
        for _ in ends:
            connection.receive()  # a failed end is moot: the session is over
        return connection.receive()

    def _connect(self) -> FrameConnection:
        """The connection to stage 1; asked anew where it listens if the known address fails
        (a restarted stage listens on another port). Nothing was sent yet: safe to retry."""
        if self._connection is not None:
            return self._connection
        p = self._pipeline
        try:
            self._connection = FrameConnection(self._peer.get(), budget=p.budget, token=p.token)
        except StageUnavailableError:
            self._peer.forget()
            self._connection = FrameConnection(self._peer.get(), budget=p.budget, token=p.token)
        return self._connection

    def _broken(self) -> None:
        """The connection broke: the sessions it carried lost their caches on the other stages."""
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        with self._lock:
            self._lost |= self._carried
        self._carried = set()
        self._peer.forget()  # it may have restarted on another port

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq
