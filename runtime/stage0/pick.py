"""Which submissions a lane's next pass carries, and when it starts: stage 0's batching policy.

Pure and thread-free: a lane (`scheduler.py`) hands `pick` its queue, its sessions' paces and
the time, and runs what comes back.

When a lane passes: as soon as every session it serves has submitted, or is late — not
back within twice its usual time between passes (deciding, streaming, drafting), nor
within a quarter of a pass of its answer — and at the latest when the oldest submission
has waited `MAX_PATIENCE_S`, so that one slow session does not hold the others up.

What a pass takes, first come first served: the oldest submission of each session, at
most `max_batch` sessions and `max_rows` rows (a tree's nodes are its rows); steps (decode
steps, draft windows, trees, the rest of a prompt that fits a step) first, each whole, then
prompts, cut to the rows left
(at most `PROMPT_ROWS_BESIDE_STEPS` beside steps), the rest of a prompt going in the next
passes; so a long prompt is prefilled in chunks between the running streams' steps, which
keep flowing, and nobody waits on it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

MAX_PATIENCE_S = 0.05  # the longest a submission waits for the lane's other sessions
FIRST_TURNAROUND_S = 0.005  # a new session's time between passes, until it was measured
PROMPT_ROWS_BESIDE_STEPS = 128  # prompt rows a pass takes beside other sessions' steps
STRAGGLER_SHARE = 0.25  # a pass waits at least this share of a pass for a session it answered
STEP_ROWS = 64  # the most rows a step has


def is_step(rows: int) -> bool:
    """Whether `rows` rows make a step: run whole, ahead of prompts, their logits computed at once."""
    return rows <= STEP_ROWS


@dataclass
class Pace:
    """A session's rhythm between passes: when its last answer was handed over, and how long it
    takes to submit again (deciding, streaming, drafting), for its lane to wait that long for it."""

    answered_at: float
    turnaround_s: float = FIRST_TURNAROUND_S

    def submitted(self, at: float) -> None:
        """The session submitted at `at`: its turnaround, smoothed."""
        self.turnaround_s = 0.8 * self.turnaround_s + 0.2 * (at - self.answered_at)

    def expected_back(self, slack: float) -> float:
        """When the session's next submission is due: twice its usual turnaround after its answer,
        or `slack` (a share of a pass: waiting less for it would cost it a whole pass)."""
        return self.answered_at + max(2 * self.turnaround_s, slack)


class Queued(Protocol):
    """A submission in a lane's queue, as the policy sees it."""

    @property
    def session(self) -> Hashable: ...

    @property
    def queued_at(self) -> float: ...

    @property
    def left(self) -> int: ...  # rows not run yet

    @property
    def whole(self) -> bool: ...  # never cut across passes (a tree: its nodes see each other)


Q = TypeVar("Q", bound=Queued)


@dataclass(frozen=True)
class Batch(Generic[Q]):
    """A lane's next pass: the rows it runs of each submission, or, not yet, when to look again."""

    picks: list[tuple[Q, int]] = field(default_factory=list)  # (submission, rows), in pass order
    wait_until: float | None = None  # set while sessions due back before then are waited for
    everyone: bool = False  # every session of the lane has a submission in the queue


def pick(queue: Sequence[Q], now: float, *, paces: Mapping[Hashable, Pace], pass_s: float,
         max_batch: int, max_rows: int) -> Batch[Q]:
    """The next pass of a lane whose sessions have `paces` and whose passes take `pass_s`, over
    its `queue` (not empty) at time `now`."""
    waiting = {sub.session for sub in queue}
    slack = STRAGGLER_SHARE * pass_s
    due = (pace.expected_back(slack) for session, pace in paces.items() if session not in waiting)
    expected = [back for back in due if back > now]
    give_up = min(sub.queued_at for sub in queue) + MAX_PATIENCE_S
    if expected and now < give_up:
        return Batch(wait_until=min(max(expected), give_up))
    return Batch(_rows(queue, max_batch, max_rows), everyone=paces.keys() <= waiting)


def _rows(queue: Sequence[Q], max_batch: int, max_rows: int) -> list[tuple[Q, int]]:
    """The oldest submission of each session, steps first, then prompts cut to the rows left."""
    firsts: dict[Hashable, Q] = {}
    for sub in sorted(queue, key=lambda s: s.queued_at):
        firsts.setdefault(sub.session, sub)
    picks: list[tuple[Q, int]] = []
    rows = 0
    limit = max_rows
    for steps in (True, False):
        if not steps and picks:
            # Beside running streams a pass takes a bounded prompt chunk, so they keep flowing.
            limit = min(limit, rows + PROMPT_ROWS_BESIDE_STEPS)
        for sub in firsts.values():
            if (sub.whole or is_step(sub.left)) != steps or len(picks) >= max_batch:
                continue
            room = limit - rows
            take = sub.left if steps else min(sub.left, room)
            if take <= 0 or take > room:
                continue
            picks.append((sub, take))
            rows += take
    return picks
