"""Stage 0's scheduler: every request's passes through the split pipeline, run as batch passes.

Each request still runs its own decode loop (drafting, verifying, sampling) on its own
thread. What it submits — a prompt chunk, one position, a draft window — waits in its
lane's queue for the lane's next pass, which carries the rows of every waiting session at
once (continuous batching): stage 0 embeds them, runs its layers over all of them, sends
one batch frame down the pipeline, and applies the head to the rows that come back. Each
stage runs the rows of all sessions in one forward pass (`LayerRange.forward_rows`).

When a lane passes: as soon as every session it serves has submitted, or is late — not
back within twice its usual time between passes (deciding, streaming, drafting), nor
within a quarter of a pass of its answer — and at the latest when the oldest submission
has waited `MAX_PATIENCE_S`, so that one slow session does not hold the others up.

What a pass takes, first come first served: the oldest submission of each session, at
most `max_batch` sessions and `max_rows` rows; decode steps and draft windows first, then
prompts, cut to the rows left (at most `PROMPT_ROWS_BESIDE_STEPS` beside steps), the rest
of a prompt going in the next passes; so a long prompt is prefilled in chunks between the
running streams' steps, which keep flowing, and nobody waits on it.

Lanes pipeline the stages: each lane has its own connection through them, so while stage
1 computes lane A's pass, stage 0 computes lane B's. A new session joins the lane with the
fewest sessions.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from layerline.errors import LayerlineError, StageUnavailableError
from layerline.proto import activation_pb2 as pb

from ..model.head import Head
from ..model.kv_cache import SessionStore
from ..model.layer_range import LayerRange
from ..stage.frame_transport import FrameConnection
from ..stage.model import StageModel
from ..stage.wire import Rows, decode_batch, encode_batch
from .pipeline import PassTrace, Pipeline

log = logging.getLogger("layerline.batching")

MAX_PATIENCE_S = 0.05  # the longest a submission waits for the lane's other sessions
FIRST_TURNAROUND_S = 0.005  # a new session's time between passes, until it was measured
PROMPT_ROWS_BESIDE_STEPS = 128  # prompt rows a pass takes beside other sessions' steps
STRAGGLER_SHARE = 0.25  # a pass waits at least this share of a pass for a session it answered
STEP_ROWS = 64  # a submission of at most this many rows is a step (its logits are computed at once)
COST_SAMPLES = 64  # recent passes (rows, seconds) kept for the cost fit
END_TIMEOUT_S = 30.0  # how long closing a session waits for its lane to end it on every stage


@dataclass(eq=False)
class _Submission:
    """One submitted pass of one session, possibly run over several batch passes (a long prompt)."""

    session: BatchSession
    tokens: list[int]
    start_pos: int
    queued_at: float
    done: int = 0  # rows already run
    pieces: list[mx.array] = field(default_factory=list)  # the last stage's hidden rows, per pass
    logits: mx.array | None = None
    error: BaseException | None = None
    discarded: bool = False
    trace: PassTrace | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def left(self) -> int:
        return len(self.tokens) - self.done


class BatchPass:
    """A pass submitted to the scheduler whose logits are not read yet (a decode loop's PendingPass)."""

    def __init__(self, submission: _Submission) -> None:
        self._submission = submission

    def result(self) -> mx.array:
        """Logits (L, vocab) of the pass: waits for the batch pass that completes it."""
        sub = self._submission
        if sub.discarded:
            raise RuntimeError("this pass was discarded")
        sub.finished.wait()
        if sub.error is not None:
            raise sub.error
        if sub.trace is not None:
            waited = time.perf_counter() - sub.queued_at - sub.trace.total_s
            sub.session.last_trace = dataclasses.replace(sub.trace, queue_s=max(0.0, waited))
        if sub.logits is None:
            # A prompt's logits: built lazily here, in the caller's thread (mlx evaluates a graph
            # on the thread that built it), and computed only if read, which prefill never does.
            head = sub.session.pipeline.head
            return head.logits(mx.concatenate(sub.pieces)[None])[0]
        return sub.logits

    def discard(self) -> None:
        """Give the pass up: dropped from the queue if it has not run yet."""
        self._submission.discarded = True
        self._submission.session.lane.withdraw(self._submission)

    def ready(self) -> bool:
        return self._submission.finished.is_set()


class BatchSession:
    """One request's session: its KV caches on every stage, its passes run in its lane's batches."""

    def __init__(self, lane: Lane, session_id: str) -> None:
        self.lane = lane
        self.session_id = session_id
        self.pipeline = lane.scheduler.pipeline
        self.last_trace: PassTrace | None = None
        self.passes = 0  # batch passes that carried this session's rows
        self.batched_with = 0  # sessions in those passes, summed (mean = batched_with / passes)
        # Between passes: when the last answer was handed over, and how long this session takes
        # to submit again (deciding, streaming, drafting), for its lane to wait that long for it.
        self.answered_at = time.perf_counter()
        self.turnaround_s = FIRST_TURNAROUND_S

    def expected_back(self, slack: float) -> float:
        """When this session's next submission is due: twice its usual turnaround after its
        answer, or `slack` (a share of a pass: waiting less for it would cost it a whole pass)."""
        return self.answered_at + max(2 * self.turnaround_s, slack)

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` placed at absolute positions start_pos.. on every stage."""
        return self.submit(tokens, start_pos).result()

    def submit(self, tokens: list[int], start_pos: int) -> BatchPass:
        """Queue `tokens` at `start_pos` for the lane's next pass; the logits come from `.result()`."""
        self.pipeline.check_tokens(tokens)
        return BatchPass(self.lane.submit(self, list(tokens), start_pos))

    @property
    def sessions_sharing(self) -> int:
        """Sessions that share this session's passes now (itself included)."""
        return self.lane.session_count

    def close(self) -> None:
        """Drop the session's caches here and on every stage (waits for its lane to do so)."""
        self.lane.end(self)


class Lane:
    """A queue of submissions, one connection through the stages and the thread that runs its passes."""

    def __init__(self, scheduler: BatchScheduler, index: int) -> None:
        self.scheduler = scheduler
        self.index = index
        self._cond = threading.Condition()
        self._sessions: set[BatchSession] = set()
        self._queue: list[_Submission] = []
        self._ending: list[tuple[str, threading.Event]] = []
        self._lost: set[str] = set()  # sessions whose caches a broken connection took away
        self._carried: set[str] = set()  # sessions with rows sent on the current connection
        self._connection: FrameConnection | None = None
        self._seq = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"batch-lane-{index}", daemon=True)
        self._thread.start()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def join(self, session: BatchSession) -> None:
        with self._cond:
            self._sessions.add(session)

    def submit(self, session: BatchSession, tokens: list[int], start_pos: int) -> _Submission:
        sub = _Submission(session, tokens, start_pos, time.perf_counter())
        session.turnaround_s = 0.8 * session.turnaround_s + 0.2 * (sub.queued_at - session.answered_at)
        with self._cond:
            if session.session_id in self._lost:
                raise StageUnavailableError("this request's caches on the other stages were lost with "
                                            "their connection", hint="send the request again")
            if self._closed:
                raise StageUnavailableError("the pipeline is shutting down", hint="send the request again")
            self._queue.append(sub)
            self._cond.notify_all()
        return sub

    def withdraw(self, sub: _Submission) -> None:
        """Take a discarded submission out of the queue if no row of it has run."""
        with self._cond:
            if sub.done == 0 and sub in self._queue:
                self._queue.remove(sub)
                self._cond.notify_all()

    def end(self, session: BatchSession) -> None:
        """Forget `session`: its queued passes are dropped, its caches dropped on every stage."""
        ended = threading.Event()
        with self._cond:
            if self._closed:
                return  # the connection closes with the lane: every stage drops its sessions
            self._sessions.discard(session)
            self._queue = [s for s in self._queue if s.session is not session]
            self._ending.append((session.session_id, ended))
            self._cond.notify_all()
        if not ended.wait(END_TIMEOUT_S):
            log.warning("event=session_end_slow session=%s lane=%d", session.session_id, self.index)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        if self._connection is not None:
            self._connection.close()

    # ------------------------------------------------------------------ the lane's thread

    def _run(self) -> None:
        while True:
            work = self._next()
            if work is None:
                return
            ending, picks = work
            try:
                self._pass(ending, picks)
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear of it
                self._fail(picks, exc)
            finally:
                for _, ended in ending:
                    ended.set()

    def _next(self) -> tuple[list[tuple[str, threading.Event]], list[tuple[_Submission, int]]] | None:
        """Wait for the next pass's work: sessions to end, and (submission, rows) to run."""
        with self._cond:
            while True:
                if self._closed:
                    for sub in self._queue:
                        sub.error = StageUnavailableError("the pipeline is shutting down")
                        sub.finished.set()
                    for _, ended in self._ending:
                        ended.set()
                    return None
                if self._queue:
                    now = time.perf_counter()
                    waiting = {s.session for s in self._queue}
                    # Wait for the sessions expected back soon; not past MAX_PATIENCE_S.
                    slack = STRAGGLER_SHARE * self.scheduler.pass_s
                    due = [s.expected_back(slack) for s in self._sessions - waiting]
                    expected = [back for back in due if back > now]
                    give_up = min(s.queued_at for s in self._queue) + MAX_PATIENCE_S
                    if not expected or now >= give_up:
                        self.scheduler.count_start(everyone=self._sessions <= waiting)
                        ending, self._ending = self._ending, []
                        return ending, self._pick()
                    self._cond.wait(min(max(expected), give_up) - now)
                elif self._ending:
                    ending, self._ending = self._ending, []
                    return ending, []
                else:
                    self._cond.wait()

    def _pick(self) -> list[tuple[_Submission, int]]:
        """The oldest submission of each session, steps first, then prompts cut to the rows left."""
        scheduler = self.scheduler
        firsts: dict[BatchSession, _Submission] = {}
        for sub in sorted(self._queue, key=lambda s: s.queued_at):
            firsts.setdefault(sub.session, sub)
        picks: list[tuple[_Submission, int]] = []
        rows = 0
        limit = scheduler.max_rows
        for steps in (True, False):
            if not steps and picks:
                # Beside running streams a pass takes a bounded prompt chunk, so they keep flowing.
                limit = min(limit, rows + PROMPT_ROWS_BESIDE_STEPS)
            for sub in firsts.values():
                if (sub.left <= STEP_ROWS) != steps or len(picks) >= scheduler.max_batch:
                    continue
                room = limit - rows
                take = sub.left if steps else min(sub.left, room)
                if take <= 0 or take > room:
                    continue
                picks.append((sub, take))
                rows += take
        return picks

    def _pass(self, ending: list[tuple[str, threading.Event]], picks: list[tuple[_Submission, int]]) -> None:
        p = self.scheduler.pipeline
        for session_id, _ in ending:
            if p.local is not None:
                p.local.drop_session(session_id)
        ends = [pb.ActivationFrame(session_id=session_id, seq=self._next_seq(), end_session=pb.EndSession())
                for session_id, _ in ending if session_id not in self._lost]
        with self._cond:
            self._lost.difference_update(session_id for session_id, _ in ending)
        self._carried.difference_update(session_id for session_id, _ in ending)
        if not picks:
            self._send_ends(ends)
            return
        started = time.perf_counter()
        rows = [Rows(sub.session.session_id, sub.start_pos + sub.done, take) for sub, take in picks]
        tokens = [t for sub, take in picks for t in sub.tokens[sub.done:sub.done + take]]
        trace = PassTrace(len(tokens), sessions=len(picks))
        with p.compute_lock:
            h = p.head.embed(mx.array([tokens]))
            if p.local is not None:
                h = p.local.forward_batch(rows, h)
            else:
                mx.eval(h)
        trace.local_s = time.perf_counter() - started
        if p.first_peer is not None:
            h = self._through_stages(ends, h, rows, trace)
        answered = time.perf_counter()
        offsets = [0]
        for _, take in picks:
            offsets.append(offsets[-1] + take)
        finished = []
        pieces = [h[0, offsets[i]:offsets[i + 1]] for i in range(len(picks))]
        mx.eval(pieces)  # here: mlx evaluates a graph only on the thread that built it
        for (sub, take), piece in zip(picks, pieces, strict=True):
            sub.pieces.append(piece)
            sub.done += take
            sub.session.passes += 1
            sub.session.batched_with += len(picks)
            if sub.left == 0:
                finished.append(sub)
        self._logits(finished)
        with self._cond:
            for sub in finished:
                if sub in self._queue:
                    self._queue.remove(sub)
        # The head, and handing each session its rows, from the answer on; set before any waiter
        # reads the trace.
        done = time.perf_counter()
        trace.head_s, trace.total_s = done - answered, done - started
        for sub in finished:
            sub.trace = trace
            sub.session.answered_at = done
            sub.finished.set()
        self.scheduler.record(len(picks), len(tokens), trace)

    def _logits(self, finished: list[_Submission]) -> None:
        """The head over every finished step's rows in one call (a prompt's logits are left to
        `BatchPass.result`, which its decode loop never reads)."""
        p = self.scheduler.pipeline
        steps = [sub for sub in finished if len(sub.tokens) <= STEP_ROWS]
        if not steps:
            return
        hidden = mx.concatenate([piece for sub in steps for piece in sub.pieces])
        with p.compute_lock:
            logits = p.head.logits(hidden[None])[0]
            mx.eval(logits)
        start = 0
        for sub in steps:
            sub.logits = logits[start:start + len(sub.tokens)]
            start += len(sub.tokens)
        mx.eval([sub.logits for sub in steps])

    def _through_stages(self, ends: list[pb.ActivationFrame], h: mx.array, rows: list[Rows],
                        trace: PassTrace) -> mx.array:
        """Send the lane's pending session ends and the batch to stage 1; the last stage's rows."""
        p = self.scheduler.pipeline
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
                    with self._cond:
                        self._lost -= sessions  # their first rows: sent again on the new connection
                    ends = []  # moot: the sessions they end were on the broken connection
                    continue
                assert p.first_peer is not None
                p.on_stage_error(1, exc.message)
                raise StageUnavailableError(f"stage 1 at {p.first_peer.control_endpoint} is unavailable: "
                                            f"{exc.message}",
                                            hint="restart that stage; stage 0 will reload it") from exc
        kind = answer.WhichOneof("body")
        if kind == "error":
            error = answer.error
            if error.code == pb.ACTIVATION_ERROR_CODE_DOWNSTREAM_UNAVAILABLE:
                p.on_stage_error(error.stage_index + 1, error.message)
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

    def _exchange(self, ends: list[pb.ActivationFrame], frame: pb.ActivationFrame,
                  sessions: set[str]) -> pb.ActivationFrame:
        """Send session ends and a batch on the lane's connection; the batch's answer."""
        connection = self._connect()
        for end in ends:
            connection.send(end)
        connection.send(frame)
        self._carried |= sessions
        for _ in ends:
            connection.receive()  # a failed end is moot: the session is over
        return connection.receive()

    def _send_ends(self, ends: list[pb.ActivationFrame]) -> None:
        if not ends or self._connection is None:
            return  # without a connection the sessions are gone from the stages already
        try:
            for end in ends:
                self._connection.send(end)
            for _ in ends:
                self._connection.receive()
        except StageUnavailableError:
            self._broken()

    def _connect(self) -> FrameConnection:
        """The lane's connection to stage 1; asked anew where it listens if the known address fails
        (a restarted stage listens on another port). Nothing was sent yet: safe to retry."""
        if self._connection is not None:
            return self._connection
        p = self.scheduler.pipeline
        assert p.first_peer is not None
        try:
            self._connection = FrameConnection(p.first_peer.get(), budget=p.budget, token=p.token)
        except StageUnavailableError:
            p.first_peer.forget()
            self._connection = FrameConnection(p.first_peer.get(), budget=p.budget, token=p.token)
        return self._connection

    def _broken(self) -> None:
        """The connection to stage 1 broke: the sessions it carried lost their caches there."""
        p = self.scheduler.pipeline
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        with self._cond:
            self._lost.update(s.session_id for s in self._sessions if s.session_id in self._carried)
        self._carried = set()
        assert p.first_peer is not None
        p.first_peer.forget()  # it may have restarted on another port

    def _fail(self, picks: list[tuple[_Submission, int]], exc: Exception) -> None:
        if not isinstance(exc, LayerlineError):
            log.exception("event=batch_pass_failed lane=%d", self.index)
        with self._cond:
            for sub, _ in picks:
                if sub in self._queue:
                    self._queue.remove(sub)
        for sub, _ in picks:
            sub.error = exc
            sub.finished.set()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq


class BatchScheduler:
    """Stage 0's lanes over one pipeline, and what their passes measured."""

    def __init__(self, pipeline: Pipeline, *, lanes: int, max_batch: int, max_rows: int) -> None:
        if lanes < 1 or max_batch < 1 or max_rows < 1:
            raise LayerlineError(f"lanes, max_batch and max_rows must be at least 1 (got {lanes}, "
                                 f"{max_batch}, {max_rows})")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._sizes: Counter[int] = Counter()  # sessions per pass -> passes
        self._starts: Counter[str] = Counter()  # why passes started: "everyone" waited, or "patience"
        self._rows = 0
        self._costs: deque[tuple[int, float]] = deque(maxlen=COST_SAMPLES)  # (rows, seconds) per pass
        self.pass_s = 0.0  # recent seconds per pass
        self.lanes = [Lane(self, i) for i in range(lanes)]

    @classmethod
    def local(cls, head: Head, layers: LayerRange, *, context_length: int, compute_dtype: Any,
              max_sessions: int, max_rows: int, lock: threading.Lock | None = None) -> BatchScheduler:
        """One lane over a whole model in this process (a draft model; stage 0 without peers),
        computing under `lock` when it shares a device with other work."""
        sessions = SessionStore(layers.make_cache, max_sessions=max_sessions)
        local = StageModel(layers, sessions, context_length, compute_dtype)
        pipeline = Pipeline(head, local, first_peer=None, wire_dtype=pb.WIRE_DTYPE_F32,
                            hidden_size=layers.hidden_size, max_tokens=max_rows)
        if lock is not None:
            pipeline.compute_lock = lock
        return cls(pipeline, lanes=1, max_batch=max_sessions, max_rows=max_rows)

    def open(self, session_id: str) -> BatchSession:
        """A new session, in the lane with the fewest."""
        with self._lock:
            lane = min(self.lanes, key=lambda lane: lane.session_count)
            session = BatchSession(lane, session_id)
            lane.join(session)
        return session

    def count_start(self, everyone: bool) -> None:
        """A pass starts: with every session of its lane (or after the patience ran out)."""
        with self._lock:
            self._starts["everyone" if everyone else "patience"] += 1

    def record(self, sessions: int, rows: int, trace: PassTrace) -> None:
        with self._lock:
            self._sizes[sessions] += 1
            self._rows += rows
            self._costs.append((rows, trace.total_s))
            self.pass_s = trace.total_s if not self.pass_s else 0.8 * self.pass_s + 0.2 * trace.total_s
        self.pipeline.record(trace)

    def pass_samples(self) -> list[tuple[int, float]]:
        """Recent passes as (rows, seconds), for the cost of a pass by its rows."""
        with self._lock:
            return list(self._costs)

    @property
    def queued(self) -> int:
        """Submissions waiting for a pass (prompt chunks and steps)."""
        return sum(lane.queued for lane in self.lanes)

    @property
    def sessions(self) -> int:
        return sum(lane.session_count for lane in self.lanes)

    def to_json(self) -> dict[str, object]:
        with self._lock:
            passes = sum(self._sizes.values())
            sessions = sum(size * n for size, n in self._sizes.items())
            return {"lanes": len(self.lanes), "max_batch": self.max_batch, "max_rows": self.max_rows,
                    "passes": passes, "batch_sizes": {str(k): v for k, v in sorted(self._sizes.items())},
                    "mean_batch": round(sessions / passes, 3) if passes else 0.0,
                    "mean_rows": round(self._rows / passes, 3) if passes else 0.0,
                    "max_seen": max(self._sizes, default=0),
                    "sessions": self.sessions, "queued": self.queued,
                    "pass_ms": round(self.pass_s * 1000, 3), "started": dict(self._starts)}

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()
