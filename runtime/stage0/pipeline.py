"""Stage 0's side of the split pipeline: its head, its own layers, the way to stage 1 (and the
failover that replaces a lost stage), and where each pass's time went (`PassTrace`). The
scheduler (`scheduler.py`) runs the passes: stage 0's compute in `forward.py`, the frames
to stage 1 in `link.py`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from layerline.errors import LayerlineError
from layerline.proto import activation_pb2 as pb

from ..model.head import Head
from ..stage.client import ActivationAddress
from ..stage.frame_budget import DEFAULT_FRAME_TIMEOUT_S, FrameBudget
from ..stage.model import StageModel
from ..stage.wire import FrameLimits
from .failover import Failover


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
    queue_s: float = 0.0  # stage 0: waiting for the batch pass to start and hand the logits over
    sessions: int = 1  # sessions whose rows the pass carried

    def add_timings(self, answer: pb.ActivationFrame, waited: float) -> None:
        """Each stage's compute and each hop's time, from the timings an answer carries, `waited`
        seconds after its frame was sent.

        Timings come back last stage first. A hop is all of a stage's wait for the next one that
        the next one did not spend computing or waiting further: the wire both ways and the
        (de)serialization at both ends, so the parts add up to the pass."""
        timings = sorted(answer.timings, key=lambda t: t.stage_index)
        waits = [waited, *(t.downstream_ns / 1e9 for t in timings)]
        for i, timing in enumerate(timings):
            self.stage_compute_s[timing.stage_index] = timing.compute_ns / 1e9
            self.hops_s.append(max(0.0, waits[i] - (timing.compute_ns + timing.downstream_ns) / 1e9))

    def to_json(self) -> dict:
        return {"positions": self.positions, "total_s": round(self.total_s, 6),
                "queue_s": round(self.queue_s, 6), "sessions": self.sessions,
                "local_s": round(self.local_s, 6), "head_s": round(self.head_s, 6),
                "stage_compute_s": {str(k): round(v, 6) for k, v in sorted(self.stage_compute_s.items())},
                "hops_s": [round(h, 6) for h in self.hops_s]}


class Pipeline:
    """What stage 0's passes run on: the head, its own layers, stage 1's address, the frames' limits."""

    def __init__(self, head: Head, local: StageModel | None, *, first_peer: str | None,
                 wire_dtype: int, hidden_size: int, max_tokens: int, token: str | None = None,
                 on_stage_error: Callable[[int, str], None] | None = None,
                 frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S, failover: Failover | None = None) -> None:
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
        self.failover = failover  # None: a lost stage fails the passes that needed it

    @property
    def supports_trees(self) -> bool:
        """Whether every stage can run a tree of rows: each runs a range of the same architecture,
        so stage 0's own range answers for them all (none: stage 0 cannot tell, so no)."""
        return self.local is not None and self.local.layers.supports_trees

    @property
    def context_length(self) -> int | None:
        """Positions a session may reach, as stage 0's own layers were loaded with (the peers' too)."""
        return self.local.context_length if self.local is not None else None

    def check_tokens(self, tokens: list[int]) -> None:
        """Refuse token ids the embedding has no row for (reading past it would crash)."""
        vocab = self.head.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise LayerlineError(f"token id {bad} is outside the vocabulary (0 to {vocab - 1})",
                                 hint="send token ids the model's tokenizer produced")
