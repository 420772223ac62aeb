"""Stage 0's scheduler: every request's passes through the split pipeline, run as batch passes.

Each request still runs its own decode loop (drafting, verifying, sampling) on its own
thread. What it submits — a prompt chunk, one position, a draft window, a tree of drafts —
waits in its
lane's queue for the lane's next pass, which carries the rows of every waiting session at
once (continuous batching): stage 0 embeds them, runs its layers over all of them, sends
one batch frame down the pipeline, and applies the head to the rows that come back. Each
stage runs the rows of all sessions in one forward pass (`LayerRange.forward_rows`).

A tree goes whole into one pass, beside other sessions' rows and trees. The accepted path
of a session's tree (`BatchSession.keep_path`) rides on the session's next frame, and every
stage, stage 0's own layers first, keeps it in place of the tree.

A lane is a queue and the thread that runs its passes; the parts it runs are apart: when a
pass starts and what it takes (`pick.py`), stage 0's own compute (`forward.py`) and the
connection through the other stages (`link.py`).

Lanes pipeline the stages: each lane has its own connection through them, so while stage
1 computes lane A's pass, stage 0 computes lane B's. A new session joins the lane with the
fewest sessions.

Each session keeps the tokens every stage's cache holds (`BatchSession.history`). With a
failover, a pass that fails on a lost stage waits for its replacement; then the lane takes
a new connection through the stages, replays every live session's tokens in prefill-sized
passes, and runs the pass again: its requests see a pause, and the same tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from layerline.errors import LayerlineError, StageUnavailableError
from layerline.proto import activation_pb2 as pb

from ..model.head import Head
from ..model.kv_cache import SessionStore
from ..model.layer_range import LayerRange
from ..model.tree import Tree, TreeError, check_tree
from ..stage.client import ActivationAddress
from ..stage.model import StageModel
from ..stage.wire import KeepPath, Rows
from .forward import Forward
from .link import Link, StageLostError
from .pick import Pace, is_step, pick
from .pipeline import PassTrace, Pipeline

log = logging.getLogger("layerline.batching")

COST_SAMPLES = 64  # recent passes (rows, seconds) kept for the cost fit
END_TIMEOUT_S = 30.0  # how long closing a session waits for its lane to end it on every stage
MAX_RECOVERIES = 3  # a pass lost this many times over (a stage too slow for it, say) fails


@dataclass(eq=False)
class _Submission:
    """One submitted pass of one session, possibly run over several batch passes (a long prompt)."""

    session: BatchSession
    tokens: list[int]
    start_pos: int  # the cache slot of its first row
    queued_at: float
    parents: tuple[int, ...] | None = None  # a tree's (its rows are the tree's last nodes); None: a chain
    done: int = 0  # rows already run
    pieces: list[mx.array] = field(default_factory=list)  # the last stage's hidden rows, per pass
    logits: mx.array | None = None
    error: BaseException | None = None
    discarded: bool = False
    trace: PassTrace | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def left(self) -> int:
        """Rows not run yet."""
        return len(self.tokens) - self.done

    @property
    def whole(self) -> bool:
        """A tree: run in one pass, never cut."""
        return self.parents is not None


class BatchPass:
    """A pass submitted to the scheduler whose logits are not read yet (a decode loop's PendingPass)."""

    def __init__(self, submission: _Submission, head: Head,
                 withdraw: Callable[[_Submission], None], logits_from: int = 0) -> None:
        self._submission = submission
        self._logits_from = logits_from  # rows before it are not read: a prompt's tail
        self._head = head  # a prompt's logits are computed only if read
        self._withdraw = withdraw  # takes the submission out of its lane's queue

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
            return self._head.logits(mx.concatenate(sub.pieces)[None, self._logits_from:])[0]
        return sub.logits[self._logits_from:]

    def discard(self) -> None:
        """Give the pass up: dropped from the queue if it has not run yet."""
        self._submission.discarded = True
        self._withdraw(self._submission)

    def ready(self) -> bool:
        return self._submission.finished.is_set()


class BatchSession:
    """One request's session: its KV caches on every stage, its passes run in its lane's batches."""

    def __init__(self, lane: Lane, session_id: str, pipeline: Pipeline) -> None:
        self.lane = lane
        self.session_id = session_id
        self.pipeline = pipeline
        self.last_trace: PassTrace | None = None
        self.passes = 0  # batch passes that carried this session's rows
        self.batched_with = 0  # sessions in those passes, summed (mean = batched_with / passes)
        self.pace = Pace(answered_at=time.perf_counter())  # when it is due back, for its lane to wait
        self._tree: Tree | None = None  # the last tree submitted, for `keep_path` to check against
        self._keep: KeepPath | None = None  # the accepted path, for the session's next frame
        self._keep_lock = threading.Lock()  # `keep_path` (the request's thread) and the lane's pass
        # What every stage's cache holds, for a replay after a failover: the token at each
        # position, and the (start_pos, parents) of a tree not compacted yet.
        self.history: list[int] = []
        self._tree_rows: tuple[int, tuple[int, ...]] | None = None

    def forward(self, tokens: list[int], start_pos: int) -> mx.array:
        """Logits (L, vocab) for `tokens` placed at absolute positions start_pos.. on every stage."""
        return self.submit(tokens, start_pos).result()

    def submit(self, tokens: list[int], start_pos: int, logits_from: int = 0) -> BatchPass:
        """Queue `tokens` at `start_pos` for the lane's next pass; the logits of the rows from
        `logits_from` come from `.result()`."""
        self.pipeline.check_tokens(tokens)
        sub = self.lane.submit(self, list(tokens), start_pos)
        self._tree = None  # as on the stages, whose frame after a tree's forgets it
        return BatchPass(sub, self.pipeline.head, self.lane.withdraw, logits_from)

    def submit_tree(self, tokens: list[int], parents: list[int], start_pos: int) -> BatchPass:
        """Queue the last len(tokens) nodes of the tree `parents` whose root sits at `start_pos`
        (all of them, as a target verifies it) for one pass; logits row i after node i's path."""
        self.pipeline.check_tokens(tokens)
        tree = Tree(start_pos, tuple(parents))
        self._check_tree(tree, len(tokens))
        sub = self.lane.submit(self, list(tokens), start_pos + len(parents) - len(tokens), tree.parents)
        self._tree = tree
        return BatchPass(sub, self.pipeline.head, self.lane.withdraw)

    def keep_path(self, start_pos: int, path: list[int]) -> None:
        """After a tree at `start_pos`, keep only the accepted `path` (tree indices, root first) on
        every stage: sent with the session's next frame, which then holds start_pos + len(path)
        positions."""
        tree = self._tree
        if tree is None or tree.base != start_pos:
            raise TreeError(f"this session has no tree at position {start_pos} to keep a path of",
                            hint="keep a path of the tree submitted last, at its start_pos")
        if path and (path[-1] >= len(tree) or list(path) != tree.path(path[-1])):
            raise TreeError(f"{list(path)} is not a root-to-node path of the tree submitted at {start_pos}",
                            hint="keep the accepted nodes, root first, each the child of the one before")
        with self._keep_lock:
            self._keep = KeepPath(start_pos, tuple(path))
        self._tree = None

    def take_keep(self) -> KeepPath | None:
        """The accepted path for the frame that carries the session's next rows (then forgotten)."""
        with self._keep_lock:
            keep, self._keep = self._keep, None
        return keep

    def give_back_keep(self, keep: KeepPath) -> None:
        """A pass that carried the accepted path failed: it rides on the next frame (or replay)."""
        with self._keep_lock:
            if self._keep is None:
                self._keep = keep

    def record(self, row: Rows, tokens: list[int]) -> None:
        """What a pass that carried `row` (of `tokens`) left in every stage's cache."""
        if row.keep is not None:
            self._compact(row.keep)
        del self.history[row.start_pos:]
        self.history.extend(tokens)
        self._tree_rows = (row.start_pos, row.parents) if row.parents is not None else None

    def _compact(self, keep: KeepPath) -> None:
        """Keep only a tree's accepted path, as every stage does."""
        self.history[keep.base:] = [self.history[keep.base + i] for i in keep.path]
        self._tree_rows = None

    def replay(self, max_rows: int) -> list[tuple[Rows, list[int]]]:
        """The rows (in order, each at most `max_rows`) that rebuild every stage's cache of this
        session from position 0, the accepted path not sent yet applied."""
        keep = self.take_keep()
        if keep is not None:
            self._compact(keep)
        tokens = self.history
        tree_start, parents = self._tree_rows or (len(tokens), None)
        chunks = [(Rows(self.session_id, pos, min(max_rows, tree_start - pos)),
                   tokens[pos:min(pos + max_rows, tree_start)]) for pos in range(0, tree_start, max_rows)]
        if parents is not None:
            chunks.append((Rows(self.session_id, tree_start, len(tokens) - tree_start, parents),
                           tokens[tree_start:]))
        return chunks

    def _check_tree(self, tree: Tree, rows: int) -> None:
        """Refuse, before it is queued, a tree that would fail its batch pass (and so every other
        session's in it)."""
        p = self.pipeline
        if not p.supports_trees:
            raise TreeError("this model's layers cannot run a tree of rows (its attention or RoPE is "
                            "its own)", hint="verify a chain of drafts instead")
        if not 1 <= rows <= len(tree):
            raise TreeError(f"{rows} tokens cannot be the last nodes of a tree of {len(tree)}",
                            hint="send one parent per node of the tree and its last nodes' tokens")
        if rows > self.lane.scheduler.max_rows:
            raise TreeError(f"a tree of {rows} rows is more than the {self.lane.scheduler.max_rows} a "
                            "pass takes", hint="draft smaller trees")
        check_tree(tree.parents, base=tree.base, context_length=p.context_length)

    @property
    def sessions_sharing(self) -> int:
        """Sessions that share this session's passes now (itself included)."""
        return self.lane.session_count

    def close(self) -> None:
        """Drop the session's caches here and on every stage (waits for its lane to do so)."""
        self.lane.end(self)


class Lane:
    """A queue of submissions and the thread that runs its passes: stage 0's compute, then the
    lane's link through the other stages."""

    def __init__(self, scheduler: BatchScheduler, index: int) -> None:
        self.scheduler = scheduler
        self.index = index
        pipeline = scheduler.pipeline
        self.forward = Forward(pipeline)
        self.link = Link(pipeline, pipeline.first_peer) if pipeline.first_peer is not None else None
        self._failover = pipeline.failover if self.link is not None else None
        self._generation = self._failover.generation if self._failover is not None else 0  # of the link
        self._cond = threading.Condition()
        self._sessions: set[BatchSession] = set()
        self._queue: list[_Submission] = []
        self._ending: list[tuple[str, threading.Event]] = []
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

    def submit(self, session: BatchSession, tokens: list[int], start_pos: int,
               parents: tuple[int, ...] | None = None) -> _Submission:
        sub = _Submission(session, tokens, start_pos, time.perf_counter(), parents)
        session.pace.submitted(sub.queued_at)
        with self._cond:
            if self.link is not None and self.link.lost(session.session_id):
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
        if self.link is not None:
            self.link.close()

    # ------------------------------------------------------------------ the lane's thread

    def _run(self) -> None:
        while True:
            work = self._next()
            if work is None:
                return
            ending, picks = work
            try:
                self._pass([session_id for session_id, _ in ending], picks)
            except StageLostError as exc:
                if self._failover is None:
                    self._fail(picks, exc)
                else:
                    self._recover(picks, exc)
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
                    scheduler = self.scheduler
                    batch = pick(self._queue, now, paces={s: s.pace for s in self._sessions},
                                 pass_s=scheduler.pass_s, max_batch=scheduler.max_batch,
                                 max_rows=scheduler.max_rows)
                    if batch.wait_until is None:
                        scheduler.count_start(everyone=batch.everyone)
                        ending, self._ending = self._ending, []
                        return ending, batch.picks
                    self._cond.wait(batch.wait_until - now)
                elif self._ending:
                    ending, self._ending = self._ending, []
                    return ending, []
                else:
                    self._cond.wait()

    def _recover(self, picks: list[tuple[_Submission, int]], lost: StageLostError) -> None:
        """A pass failed on a lost stage: wait for its repair, then run the pass again (after the
        replay); the picks fail if the pipeline is degraded instead."""
        assert self._failover is not None
        for _ in range(MAX_RECOVERIES):
            try:
                self._failover.wait(self._generation)
                with self._cond:
                    ended = [(sub, take) for sub, take in picks if sub.session not in self._sessions]
                picks = [pick for pick in picks if pick not in ended]
                self._fail(ended, StageUnavailableError("the request ended during the failover"))
                self._pass([], picks)
                return
            except StageLostError as exc:
                lost = exc  # lost again (the replacement too): wait for the next repair
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear of it
                self._fail(picks, exc)
                return
        self._fail(picks, lost)

    def _catch_up(self) -> None:
        """After a repair: a new connection through the stages, and every live session's tokens
        replayed on it, before this lane's next pass."""
        failover = self._failover
        if failover is None or failover.generation == self._generation:
            return
        assert self.link is not None and failover.first_peer is not None
        self._generation = failover.generation
        self.link.relink(ActivationAddress(failover.first_peer, self.scheduler.pipeline.token))
        with self._cond:
            sessions = list(self._sessions)
        self.forward.drop([s.session_id for s in sessions])  # stage 0's own layers start again too
        pending = [deque(s.replay(self.scheduler.max_rows)) for s in sessions]
        while any(pending):
            # One pass takes the next rows of as many sessions as fit.
            rows: list[Rows] = []
            tokens: list[int] = []
            for chunks in pending:
                if chunks and len(tokens) + chunks[0][0].count <= self.scheduler.max_rows:
                    row, row_tokens = chunks.popleft()
                    rows.append(row)
                    tokens += row_tokens
            h = self.forward.layers(rows, tokens)
            self.link.send(h, rows, PassTrace(len(tokens), sessions=len(rows)))
        if sessions:
            failover.replayed(len(sessions))
        log.info("event=replayed lane=%d sessions=%d positions=%d generation=%d", self.index,
                 len(sessions), sum(len(s.history) for s in sessions), self._generation)

    def _pass(self, ending: list[str], picks: list[tuple[_Submission, int]]) -> None:
        """End the `ending` sessions and run the picked rows; hand each finished submission its answer."""
        self._catch_up()
        self.forward.drop(ending)
        if not picks:
            if self.link is not None:
                self.link.end(ending)
            return
        started = time.perf_counter()
        # A session's first rows since `keep_path` carry the accepted path (to stage 0's layers too).
        rows = [Rows(sub.session.session_id, sub.start_pos + sub.done, take, sub.parents,
                     sub.session.take_keep())
                for sub, take in picks]
        tokens = [t for sub, take in picks for t in sub.tokens[sub.done:sub.done + take]]
        trace = PassTrace(len(tokens), sessions=len(picks))
        try:
            h = self.forward.layers(rows, tokens)
            trace.local_s = time.perf_counter() - started
            if self.link is not None:
                h = self.link.send(h, rows, trace, ending=ending)
        except Exception:
            for (sub, _), row in zip(picks, rows, strict=True):
                if row.keep is not None:
                    sub.session.give_back_keep(row.keep)
            raise
        answered = time.perf_counter()
        offsets = [0]
        for _, take in picks:
            offsets.append(offsets[-1] + take)
        finished = []
        pieces = [h[0, offsets[i]:offsets[i + 1]] for i in range(len(picks))]
        mx.eval(pieces)  # here: mlx evaluates a graph only on the thread that built it
        for (sub, take), row, piece in zip(picks, rows, pieces, strict=True):
            sub.session.record(row, sub.tokens[sub.done:sub.done + take])
            sub.pieces.append(piece)
            sub.done += take
            sub.session.passes += 1
            sub.session.batched_with += len(picks)
            if sub.left == 0:
                finished.append(sub)
        # The head over every finished step's rows in one call (a prompt's logits are left to
        # `BatchPass.result`, which its decode loop never reads).
        steps = [sub for sub in finished if sub.whole or is_step(len(sub.tokens))]
        if steps:
            hidden = mx.concatenate([piece for sub in steps for piece in sub.pieces])
            logits = self.forward.logits(hidden, [len(sub.tokens) for sub in steps])
            for sub, sub_logits in zip(steps, logits, strict=True):
                sub.logits = sub_logits
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
            sub.session.pace.answered_at = done
            sub.finished.set()
        self.scheduler.record(len(picks), len(tokens), trace)

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
            session = BatchSession(lane, session_id, self.pipeline)
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
