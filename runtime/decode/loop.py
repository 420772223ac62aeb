"""The one decode loop: plain decoding and speculative decoding, for `layerline run`,
stage 0's serving and `layerline bench decode` alike. Plain decoding is a window of 0.

One step, with `s` the committed sequence (prompt plus generated tokens):

1. the window policy picks w (never more than is left of max_tokens or the context);
2. the drafter proposes d1..dw (maybe fewer; none is a plain step);
3. ONE target call `forward([s[-1], d1..dw], start_pos=len(s) - 1)` gives w + 1 rows of
   logits: row i is the target's next-token distribution after d1..di;
4. greedy: accept the longest prefix of drafts equal to the rows' argmax, then the argmax
   of the first row not matched (or of the last row). Sampled (Leviathan et al. 2023):
   accept di with probability min(1, p(di) / q(di)); at the first rejection draw from
   norm(max(0, p - q)) and stop; after full acceptance draw one more token from p. p and q
   are the request's own distributions (repetition penalty, top-k, top-p, min-p,
   temperature), so the output follows exactly the target's sampling distribution. All
   rows are scored in one batch of array operations;
5. the target and the drafter forget the rejected positions.

With `overlap`, step 3 is `submit` then `result`: while the target verifies, the drafter
continues past its window from the state where every draft stands, its first token being its
guess of the target's own token, until the pass's answer is there. When the step commits
exactly that (all drafts and the guess), the next step verifies the window so prepared;
otherwise it is discarded and the drafter rolls back. `run_ahead` also submits the prepared
window before the verdict; a rejected one is discarded (dropped unrun if its pass has not
started, else the next pass's start_pos rolls it back).

With `tree` (a `TreeShape`, or a `TreePolicy` that sizes each step's tree: tree_policy.py), a
step that drafts verifies a tree instead of a chain (draft_tree.py): the drafter proposes it
(`propose_tree`), ONE target pass `submit_tree(root + nodes, parents, len(s) - 1)` gives a
row per node, tree_accept.py picks the accepted path (greedy: plain greedy's tokens;
sampled: SpecInfer's multi-candidate rule, exact), the target keeps that path alone
(`keep_path`) and the drafter syncs. The window policy still decides whether a step drafts
(its gate, what is left of the request); the tree policy decides how much (None: the step is
plain). Trees do not overlap with the pass (`overlap` is refused with them).

The first step drafts nothing (`first_token_first`): the token that ends the prompt's
prefill streams at once, and speculation starts from the second token.

When the policy never drafts and the target is `lazy` (it runs in this process), the loop
queues step n+1 (`forward_lazy`, `mx.async_eval`) before it reads token n, as mlx-lm's `generate_step`
does, so building the next graph overlaps the compute.

Tokens are yielded one at a time: the caller checks its stop strings and may close the
generator in the middle of a step's accepted run; the `finally` then rolls the target and
the drafter back to what was yielded. A stop token id ends the generation (it is yielded).
The target holds every committed token but the last, which the next step feeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from layerline.errors import ContextLengthError, LayerlineError

from .batch_window import accept_estimate
from .draft_tree import TreeShape, fit_vocab
from .drafters import Drafter, NoDrafter
from .sampling import SamplingParams, log_softmax
from .targets import PREFILL_STEP, PassTiming, PendingPass, Target
from .token_distribution import probabilities, recent_rows, recent_tokens, request_key, scores
from .tree_accept import accept_tree
from .tree_policy import FixedTree, TreePolicy
from .window_cost import StepMeasurement
from .window_policy import GateDecision, NoDrafting, WindowPolicy

log = logging.getLogger("layerline.decode")

_NO_HISTORY = mx.zeros((0,), dtype=mx.uint32)  # what the penalty looks at when it is off
# Drafting is timed for the cost model only when the draft caught up on no more than a step
# leaves it (the last token, a fully accepted window's last draft, and, after a tree, whose
# nodes the draft forgets, the accepted path): catching up on a prompt, or on what was
# committed while drafting was off, is not what a draft costs, and counting it would keep an
# auto policy from ever drafting again.
TIMED_CATCH_UP = 2

# A token's log-probability and the likeliest alternatives (id, log-probability), best first.
TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float | None = None  # the target's log-probability of the token (raw logits)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the likeliest alternatives, best first
    drafted: bool = False  # proposed by the drafter and accepted, else chosen by the target


@dataclass
class StepClock:
    """When one step reached each of its parts (`time.perf_counter()`), set as the step goes."""

    started: float
    drafted: float = 0.0  # the window is drafted (or taken from the last pass)
    prepared: float = 0.0  # the pass is sent and, with overlap, the next window drafted meanwhile
    verified: float = 0.0  # the pass's logits are read
    done: float = 0.0  # accepted, sampled, rolled back

    @property
    def draft_s(self) -> float:
        """Proposing the window."""
        return self.drafted - self.started

    @property
    def target_s(self) -> float:
        """The target pass, from sending it to reading its logits."""
        return self.verified - self.drafted

    @property
    def overlap_s(self) -> float:
        """Of target_s, sending the pass and drafting the next window while it ran."""
        return self.prepared - self.drafted

    @property
    def decide_s(self) -> float:
        """Acceptance, sampling, rollback."""
        return self.done - self.verified

    @property
    def seconds(self) -> float:
        """The whole step."""
        return self.done - self.started


@dataclass(frozen=True)
class StepRecord:
    """One step of one request, for the per-pass profile (`--trace`)."""

    positions: int  # fed to the target: the last token plus the drafts
    drafted: int
    accepted: int
    tokens: int  # committed by the step
    clock: StepClock
    trace: PassTiming | None = None  # the target's own breakdown of its pass, when it has one
    guessed: bool | None = None  # the window prepared meanwhile was used (None: none prepared)
    tree_shape: tuple[int, int] | None = None  # a tree step's (depth, width) asked for; None: a chain
    tree_depth: int = 0  # a tree step's deepest node (its nodes are `drafted`, its path `accepted`)


@dataclass
class GenerationStats:
    prompt_tokens: int
    tokens: int = 0  # tokens yielded
    drafted: int = 0  # draft tokens sent to the target for verification
    accepted: int = 0  # of those, accepted (whether or not the caller read them all)
    target_passes: int = 0  # target passes after prefill (one per step)
    draft_seconds: float = 0.0  # in the drafter's propose()
    verify_seconds: float = 0.0  # in target passes after prefill, and deciding on their logits
    overlap_draft_seconds: float = 0.0  # of verify_seconds, drafting the next window meanwhile
    overlap_hits: int = 0  # windows drafted during a pass and used (every draft and the guess stood)
    overlap_misses: int = 0  # windows drafted during a pass and discarded
    windows: list[int] = field(default_factory=list)  # drafts verified by each step, in order
    yielded_steps: int = 0  # steps that drafted less than the policy's window, for the batch's sake
    prefill_seconds: float = 0.0  # the prompt but its last token
    first_token_seconds: float = 0.0  # from the start to the first token
    decode_seconds: float = 0.0  # from the first token to the last
    finish_reason: str = ""  # "stop" | "length" | "" (closed by the caller)
    gate: GateDecision | None = None  # the window policy's verdict when the request ended
    tree_steps: int = 0  # steps that verified a drafted tree (their nodes count in `drafted`)
    tree_paths: list[int] = field(default_factory=list)  # drafted nodes accepted by each tree step
    # Index d - 1: tree steps whose tree reached depth d, and whose accepted path did.
    tree_depths_drafted: list[int] = field(default_factory=list)
    tree_depths_accepted: list[int] = field(default_factory=list)

    @property
    def accept_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accept_rate_by_depth(self) -> list[float]:
        """Of the tree steps whose tree reached depth d, the share whose accepted path did too."""
        return [a / d for a, d in zip(self.tree_depths_accepted, self.tree_depths_drafted, strict=True)]

    def count_tree(self, nodes: int, depth: int, path: int) -> None:
        """One tree step: `nodes` drafted down to `depth`, `path` of them accepted."""
        self.tree_steps += 1
        self.tree_paths.append(path)
        grow = depth - len(self.tree_depths_drafted)
        if grow > 0:
            self.tree_depths_drafted += [0] * grow
            self.tree_depths_accepted += [0] * grow
        for d in range(depth):
            self.tree_depths_drafted[d] += 1
            self.tree_depths_accepted[d] += d < path

    @property
    def tokens_per_pass(self) -> float:
        """Tokens yielded per target pass."""
        return self.tokens / self.target_passes if self.target_passes else 0.0

    @property
    def prefill_tps(self) -> float:
        """Prompt tokens per second, up to the first token."""
        return self.prompt_tokens / self.first_token_seconds if self.first_token_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first."""
        return (self.tokens - 1) / self.decode_seconds if self.tokens > 1 and self.decode_seconds > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        tree = {"tree": {
            "steps": self.tree_steps, "paths": compress_windows(self.tree_paths),
            "depths_drafted": self.tree_depths_drafted, "depths_accepted": self.tree_depths_accepted,
            "accept_rate_by_depth": [round(r, 4) for r in self.accept_rate_by_depth],
        }} if self.tree_steps else {}
        return {**tree,
            "prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "drafted": self.drafted,
            "accepted": self.accepted, "accept_rate": round(self.accept_rate, 4),
            "target_passes": self.target_passes, "tokens_per_pass": round(self.tokens_per_pass, 4),
            "draft_seconds": round(self.draft_seconds, 6),
            "verify_seconds": round(self.verify_seconds, 6),
            "overlap_draft_seconds": round(self.overlap_draft_seconds, 6),
            "overlap_hits": self.overlap_hits, "overlap_misses": self.overlap_misses,
            "windows": compress_windows(self.windows), "yielded_steps": self.yielded_steps,
            "prefill_seconds": round(self.prefill_seconds, 6), "finish_reason": self.finish_reason,
            "gate": self.gate.to_json() if self.gate is not None else None,
        }

    def describe(self) -> str:
        """`prefill 31 tok 412.3 tok/s, decode 64 tok 52.1 tok/s, finish=stop`, and the drafting."""
        line = (f"prefill {self.prompt_tokens} tok {self.prefill_tps:.1f} tok/s, "
                f"decode {self.tokens} tok {self.decode_tps:.1f} tok/s, finish={self.finish_reason}")
        if self.drafted:
            line += (f"; drafted {self.drafted} accepted {self.accepted} ({self.accept_rate:.0%}), "
                     f"{self.tokens_per_pass:.1f} tok/pass, draft {self.draft_seconds:.2f}s "
                     f"verify {self.verify_seconds:.2f}s")
        if self.tree_steps:
            line += (f"; {self.tree_steps} trees, {sum(self.tree_paths) / self.tree_steps:.1f} drafts "
                     f"accepted per tree, by depth "
                     + " ".join(f"{rate:.0%}" for rate in self.accept_rate_by_depth))
        return line


def check_prompt(prompt: list[int], context_length: int | None) -> None:
    """Raise ContextLengthError unless the prompt is non-empty and leaves room for a token."""
    if not prompt:
        raise ContextLengthError("the prompt is empty", hint="give at least one token of prompt")
    if context_length is not None and len(prompt) >= context_length:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens, but the model's context length is {context_length}",
            hint=f"shorten the prompt to fewer than {context_length} tokens")


def plain_choice(logits: mx.array, recent: mx.array, params: SamplingParams,
                 key: mx.array) -> tuple[mx.array, mx.array]:
    """The target's own next token from one row of logits (1, V), lazily, and the next key.

    Both paths of the loop choose plain tokens here, so a seed gives the same text whether a
    request runs in one process or through the split pipeline.
    """
    key, _, draw_key = mx.random.split(key, 3)
    if params.greedy:
        return mx.argmax(scores(logits, recent, params), axis=-1), key
    p = probabilities(logits, recent, params)
    return mx.random.categorical(mx.log(p), key=draw_key), key


def token_logprobs(logits: mx.array, tokens: list[int], k: int) -> list[TokenLogprobs]:
    """Each token's log-probability under its row of raw logits (L, V), and the row's top k."""
    values = log_softmax(logits)
    out = []
    for i, token in enumerate(tokens):
        top: tuple[tuple[int, float], ...] = ()
        if k:
            best = mx.argpartition(-values[i], kth=k - 1)[:k]
            chosen = values[i][best]
            order = mx.argsort(-chosen)
            top = tuple(zip(best[order].tolist(), chosen[order].tolist(), strict=True))
        out.append((float(values[i, token].item()), top))
    return out


@dataclass
class Generation:
    """One request's token stream: iterate for tokens, then read `stats`."""

    target: Target  # an empty session of the target model
    prompt: list[int]
    params: SamplingParams
    drafter: Drafter = field(default_factory=NoDrafter)
    policy: WindowPolicy = field(default_factory=NoDrafting)
    context_length: int | None = None
    prefill_step: int = PREFILL_STEP
    first_token_first: bool = True
    on_step: Callable[[StepRecord], None] | None = None
    overlap: bool = False  # draft the next window while the target verifies this one
    run_ahead: bool = False  # and send it into the target before the verdict (needs overlap)
    # (policy's window, accept rate) -> the window worth drafting while other requests share the
    # passes (batch_window.py); None: the policy's window stands.
    window_cap: Callable[[int, float], int] | None = None
    tree: TreePolicy | None = None  # verify a drafted tree in each drafting step, not a chain
    stats: GenerationStats = field(init=False)
    tokens: list[int] = field(init=False, default_factory=list)  # yielded, in order

    def __post_init__(self) -> None:
        check_prompt(self.prompt, self.context_length)
        if self.tree is not None and self.overlap:
            raise LayerlineError("token trees do not overlap with the target's pass",
                                 hint="drop overlap/run-ahead, or draft chains (no tree)")
        if self.tree is not None and not self.target.supports_trees:
            raise LayerlineError("this target cannot verify a token tree (its attention or RoPE "
                                 "takes one chain)", hint="draft chains for this model (no tree)")
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))
        self._key = request_key(self.params.seed, stream=0)
        self._started = False
        # Timings must not decide which steps speculate when a seed must reproduce the text.
        self._gated = self.params.greedy or self.params.seed is None
        self._prepared: _Prepared | None = None  # the next step's window, drafted during a pass
        self._ahead: PendingPass | None = None  # the pass of `_prepared`, sent before the verdict
        self._tail: list[int] = []  # the prompt's last chunk, fed with the first step
        self._last_accepted = 0  # drafts the last step kept (what the draft may replay of it)

    @property
    def _limit(self) -> int:
        limit = self.params.max_tokens
        if self.context_length is not None:
            # The last token is never fed: tokens may reach one past the last position.
            limit = min(limit, self.context_length - len(self.prompt) + 1)
        return limit

    def __iter__(self) -> Iterator[Token]:
        if self._started:
            raise RuntimeError("a Generation runs once; make another for another run")
        self._started = True
        self._started_at = time.perf_counter()
        committed = list(self.prompt)
        try:
            plain_ahead = not self.policy.drafts and self.target.lazy
            self._prefill(keep_tail=not plain_ahead)
            if plain_ahead:
                yield from self._plain_ahead(committed)
            else:
                yield from self._steps(committed)
        finally:
            # Closed mid-run or not: both sides keep exactly what was yielded.
            if self._ahead is not None:
                self._ahead.discard()
                self._ahead = None
            self._prepared = None
            self.target.rewind(len(committed) - 1)
            self.drafter.sync(committed)
            self.stats.gate = self.policy.decision
            log.debug("event=generation_done tokens=%d drafted=%d accepted=%d passes=%d finish=%s",
                      self.stats.tokens, self.stats.drafted, self.stats.accepted,
                      self.stats.target_passes, self.stats.finish_reason or "closed")

    def _emit(self, committed: list[int], token: Token) -> bool:
        """Count a token about to be yielded; True when it ends the generation."""
        stats = self.stats
        now = time.perf_counter()
        if stats.tokens == 0:
            stats.first_token_seconds, self._first_at = now - self._started_at, now
        stats.decode_seconds = now - self._first_at
        committed.append(token.id)
        self.tokens.append(token.id)
        stats.tokens += 1
        if token.id in self.params.stop_token_ids:
            stats.finish_reason = "stop"
            return True
        if stats.tokens >= self._limit:
            stats.finish_reason = "length"
            return True
        return False

    # ------------------------------------------------------------ plain, queued one ahead

    def _plain_ahead(self, committed: list[int]) -> Iterator[Token]:
        params, stats = self.params, self.stats
        recent = recent_tokens(committed, params)
        position = len(committed) - 1
        pending = self._queue(mx.array([committed[-1]], dtype=mx.uint32), position, recent)
        while True:
            token, logits, recent = pending
            position += 1
            if stats.tokens + 1 < self._limit:
                pending = self._queue(token, position, recent)  # computed while we read `token`
            started = time.perf_counter()
            token_id = int(token.item())
            logprob, top = (None, ())
            if params.logprobs:
                logprob, top = token_logprobs(logits, [token_id], params.top_logprobs)[0]
            stats.target_passes += 1
            stats.verify_seconds += time.perf_counter() - started
            done = self._emit(committed, Token(token_id, logprob, top))
            yield Token(token_id, logprob, top)
            if done:
                return

    def _queue(self, token: mx.array, position: int,
               recent: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """The next token's graph, queued for evaluation: (token, its logits row, new history)."""
        logits = self.target.forward_lazy(token, position)[-1:]
        chosen, self._key = plain_choice(logits, recent, self.params, self._key)
        if self.params.repetition_penalty != 1.0:
            recent = recent_tokens(mx.concatenate([recent, chosen.astype(mx.uint32)]), self.params)
        mx.async_eval(chosen, logits)
        return chosen, logits, recent

    # ------------------------------------------------------------ steps: draft, verify

    def _steps(self, committed: list[int]) -> Iterator[Token]:
        stats = self.stats
        while True:
            room = self._limit - stats.tokens - 1  # drafts beyond the step's own token
            window = self.policy.next_window(room, gated=self._gated)
            if self.first_token_first and stats.target_passes == 0:
                window = 0
            capped = self._capped(window)
            if capped < window:
                stats.yielded_steps += 1
                window = capped
            shape = None
            if self.tree is not None and window > 0:
                shape = self.tree.next_shape(room, gated=self._gated)
            if shape is not None:
                out, accepted, logprobs = self._tree_step(committed, shape)
            else:
                out, accepted, logprobs = self._step(committed, 0 if self.tree is not None else window)
            for i, token in enumerate(out):
                logprob, top = logprobs[i] if logprobs is not None else (None, ())
                emitted = Token(token, logprob, top, drafted=i < accepted)
                done = self._emit(committed, emitted)
                yield emitted
                if done:
                    return

    def _step(self, committed: list[int], window: int) -> tuple[list[int], int, list[TokenLogprobs] | None]:
        """Draft (or take the window prepared during the last pass), verify in one target pass,
        prepare the next window meanwhile, roll back: tokens committed, how many were drafts."""
        stats = self.stats
        clock = StepClock(started=time.perf_counter())
        prepared, ahead = self._prepared, self._ahead
        self._prepared = self._ahead = None
        if prepared is not None and window > 0:
            # The last step's guess held: its prepared window continues exactly `committed`.
            step = prepared.step if ahead is not None else prepared.step.cut(window)
            drafted_tokens = 0
            if ahead is None and len(step.tokens) < window and step.proposed == len(step.tokens):
                # The pass ended before the whole window was drafted: draft the rest now.
                more = window - len(step.tokens)
                drafts, q = self.drafter.propose(committed + step.tokens, more)
                step = step.extend(_Drafts.usable(drafts, q, more, self.target.vocab_size))
                drafted_tokens = len(drafts)
        else:
            if ahead is not None:
                ahead.discard()
                ahead = None
            drafts, q = self.drafter.propose(committed, window) if window > 0 else ([], None)
            step = _Drafts.usable(drafts, q, window, self.target.vocab_size)
            drafted_tokens = len(drafts)
        clock.drafted = time.perf_counter()
        timed_draft = drafted_tokens > 0 and self._drafting_timed()
        tail, self._tail = self._tail, []  # the prompt's last chunk rides with the first step
        if len(tail) + 1 + len(step.tokens) > self.prefill_step:
            self._feed(tail, len(committed) - 1 - len(tail))
            tail = []
        pending = ahead or self.target.submit([*tail, committed[-1], *step.tokens],
                                              len(committed) - 1 - len(tail), logits_from=len(tail))
        upcoming = self._prepare(committed, step, pending) if self.overlap else None
        clock.prepared = time.perf_counter()
        if upcoming is not None and self.run_ahead:
            # Into the pipeline before the verdict: a stage drops it if the verdict rejects it.
            self._ahead = self.target.submit(upcoming.prefix[-1:] + upcoming.step.tokens,
                                             len(upcoming.prefix) - 1)
        logits = pending.result()
        clock.verified = time.perf_counter()
        accepted, chosen = self._verify(logits, committed, step)
        out = [*step.tokens[:accepted], chosen]
        logprobs = (token_logprobs(logits[:len(out)], out, self.params.top_logprobs)
                    if self.params.logprobs else None)
        now_committed = committed + out
        guessed = None
        if upcoming is not None:
            guessed = upcoming.prefix == now_committed
            if guessed:
                self._prepared = upcoming
                stats.overlap_hits += 1
            else:
                stats.overlap_misses += 1
                if self._ahead is not None:
                    self._ahead.discard()  # dropped unrun if its pass has not started
                    self._ahead = None
        if self._ahead is None:
            # Forget the rejected positions now: everything committed but the last is held.
            self.target.rewind(len(now_committed) - 1)
        if self._prepared is None:
            self.drafter.sync(now_committed)  # after a hit it holds the prepared window: keep it
        clock.done = time.perf_counter()
        stats.draft_seconds += clock.draft_s
        stats.overlap_draft_seconds += clock.overlap_s if upcoming is not None else 0.0
        stats.verify_seconds += clock.done - clock.drafted
        stats.target_passes += 1
        stats.drafted += step.proposed
        stats.accepted += accepted
        stats.windows.append(len(step.tokens))
        trace = self.target.last_trace
        # The pass's own cost is known when it was sent in this step and its answer was not
        # there yet once the drafting ended.
        waited = upcoming is None or clock.verified - clock.prepared > 0.002
        measured = StepMeasurement(
            drafted=step.proposed, accepted=accepted, seconds=clock.seconds, committed=len(out),
            positions=len(step.tokens) + 1,
            draft_s=clock.draft_s if timed_draft else None, draft_tokens=drafted_tokens,
            pass_s=clock.target_s if ahead is None and waited and not tail else None,
            stage0_share=_stage0_share(trace),
            guessed=guessed if accepted == len(step.tokens) else None,
            prepare_s=clock.overlap_s if upcoming is not None else None,
            prepare_tokens=upcoming.drafted if upcoming is not None else 0)
        self.policy.costs.record_step(measured)
        self.policy.record(measured)
        if self.on_step is not None:
            self.on_step(StepRecord(positions=len(step.tokens) + 1, drafted=step.proposed, accepted=accepted,
                                    tokens=len(out), clock=clock, trace=trace, guessed=guessed))
        self._last_accepted = accepted
        return out, accepted, logprobs

    def _drafting_timed(self) -> bool:
        """The last proposal's time is what drafting costs (TIMED_CATCH_UP's rule)."""
        return self.drafter.replayed <= TIMED_CATCH_UP + self._last_accepted

    def _tree_step(self, committed: list[int],
                   shape: TreeShape) -> tuple[list[int], int, list[TokenLogprobs] | None]:
        """Draft a tree of `shape`, verify it in one target pass, keep the accepted path:
        tokens committed, how many were drafts."""
        stats = self.stats
        assert self.tree is not None
        clock = StepClock(started=time.perf_counter())
        tree = self.drafter.propose_tree(committed, shape).within(self.target.vocab_size)
        clock.drafted = time.perf_counter()
        timed_draft = self._drafting_timed()
        start = len(committed) - 1
        tail, self._tail = self._tail, []
        if tail:  # the prompt's last chunk: a chain in front of the tree's root
            self._feed(tail, start - len(tail))
        pending = self.target.submit_tree(list(tree.tokens), list(tree.parents), start)
        clock.prepared = time.perf_counter()
        logits = pending.result()
        clock.verified = time.perf_counter()
        verdict, self._key = accept_tree(logits, committed, tree, self.params, self._key)
        out = verdict.tokens
        logprobs = (token_logprobs(logits[mx.array(verdict.path)], out, self.params.top_logprobs)
                    if self.params.logprobs else None)
        # The target then holds a chain again: everything committed but the last token.
        self.target.keep_path(start, verdict.path)
        self.drafter.sync(committed + out)
        clock.done = time.perf_counter()
        stats.draft_seconds += clock.draft_s
        stats.verify_seconds += clock.done - clock.drafted
        stats.target_passes += 1
        stats.drafted += tree.size
        stats.accepted += verdict.accepted
        stats.windows.append(tree.size)
        stats.count_tree(tree.size, tree.depth, verdict.accepted)
        self.tree.record(shape.width, tree.depth, verdict.accepted)
        if timed_draft:
            self.policy.costs.record_tree_draft(tree.depth, clock.draft_s)
        trace = self.target.last_trace
        # The tree's pass cost V(n) by its nodes; the drafting cost per node is a tree's own
        # (a call per depth), not the chain's per token, so the chain's measure is left alone.
        measured = StepMeasurement(
            drafted=tree.size, accepted=verdict.accepted, seconds=clock.seconds, committed=len(out),
            positions=len(tree.tokens), pass_s=clock.target_s if not tail else None,
            stage0_share=_stage0_share(trace))
        self.policy.costs.record_step(measured)
        self.policy.record(measured)
        if self.on_step is not None:
            self.on_step(StepRecord(positions=len(tree.tokens), drafted=tree.size, accepted=verdict.accepted,
                                    tokens=len(out), clock=clock, trace=trace,
                                    tree_shape=(shape.depth, shape.width), tree_depth=tree.depth))
        self._last_accepted = verdict.accepted
        return out, verdict.accepted, logprobs

    def _prepare(self, committed: list[int], step: _Drafts, pending: PendingPass) -> _Prepared | None:
        """While the target verifies `step`: the next step's window, from the state where every
        draft of `step` stands and the target's next token is the drafter's own guess. Drafting
        stops when the pass's answer is there (the rest of the window is drafted if it is used)."""
        # What the next step may draft if this one commits all its drafts and one token more.
        room = self._limit - (self.stats.tokens + len(step.tokens) + 1) - 1
        window = self.policy.window_after_full_acceptance(room, gated=self._gated) if room > 0 else 0
        window = self._capped(window)
        if window <= 0:
            return None
        base = committed + step.tokens
        drafts, q = self.drafter.propose(base, window + 1, until=pending.ready)
        vocab = self.target.vocab_size
        if len(drafts) < 2 or not 0 <= drafts[0] < vocab:
            return None
        upcoming = _Drafts.usable(drafts[1:], None if q is None else q[1:], window, vocab)
        if not upcoming.tokens:
            return None
        return _Prepared([*base, drafts[0]], upcoming, len(drafts))

    def _capped(self, window: int) -> int:
        """The window worth drafting with the load the target shares (timings never decide
        for a seeded sampled request, whose text must reproduce)."""
        if window <= 0 or self.window_cap is None or not self._gated:
            return window
        return self.window_cap(window, accept_estimate(self.stats.drafted, self.stats.accepted))

    def _prefill(self, keep_tail: bool) -> None:
        """Feed the prompt but its last token, which the first step feeds; with `keep_tail`, the
        first step also feeds the last chunk, so that a short prompt takes one pass, not two."""
        started = time.perf_counter()
        head = self.prompt[:-1]
        starts = list(range(0, len(head), self.prefill_step))
        if keep_tail and starts:
            self._tail = head[starts.pop():]
        for start in starts:
            self._feed(head[start:start + self.prefill_step], start)
        self.stats.prefill_seconds = time.perf_counter() - started

    def _feed(self, tokens: list[int], start: int) -> None:
        """Put prompt tokens into the target's caches; only the last row's logits are computed (the
        head over a chunk's every row cost Qwen 1.5B a tenth of its prefill) and none is read."""
        self.target.submit(tokens, start, logits_from=len(tokens) - 1).result()

    def _verify(self, logits: mx.array, committed: list[int], step: _Drafts) -> tuple[int, int]:
        """How many drafts stand, and the token the target adds after them."""
        params, drafts = self.params, step.tokens
        if not drafts:
            chosen, self._key = plain_choice(logits[-1:], recent_tokens(committed, params), params, self._key)
            return 0, int(chosen.item())
        # Row i follows committed + d1..di: the penalty looks at those tokens. One batch for all rows.
        rows = recent_rows(committed, drafts, params) if params.repetition_penalty != 1.0 else _NO_HISTORY
        if params.greedy:
            best = mx.argmax(scores(logits, rows, params), axis=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == best[accepted]:
                accepted += 1
            return accepted, best[accepted]
        p = probabilities(logits, rows, params)
        self._key, accept_key, draw_key = mx.random.split(self._key, 3)
        ids = mx.array(drafts, dtype=mx.uint32)[:, None]
        p_d = mx.take_along_axis(p[:-1], ids, axis=-1)[:, 0]
        q_d = mx.ones(len(drafts)) if step.q is None else mx.take_along_axis(step.q, ids, axis=-1)[:, 0]
        u = mx.random.uniform(shape=(len(drafts),), key=accept_key)
        rejected = (u * q_d >= p_d).tolist()  # accept with probability min(1, p/q)
        accepted = rejected.index(True) if True in rejected else len(drafts)
        target = p[accepted]
        if accepted < len(drafts):
            target = _residual(target, drafts[accepted], None if step.q is None else step.q[accepted])
        elif step.cut_q is not None:  # the next draft was outside the vocabulary: a rejection
            target = _residual(target, -1, step.cut_q)
        chosen = mx.random.categorical(mx.log(target), key=draw_key)
        return accepted, int(chosen.item())


@dataclass(frozen=True)
class _Drafts:
    """The drafts a step verifies, their q rows, and what was cut off."""

    tokens: list[int]
    q: mx.array | None  # (len(tokens), target vocab), or None: q = 1 on each token
    proposed: int  # drafts counted as proposed: the verified ones, plus one cut off
    cut_q: mx.array | None = None  # q row of a draft cut off for being outside the vocabulary

    @classmethod
    def usable(cls, tokens: list[int], q: mx.array | None, window: int, vocab: int) -> _Drafts:
        """At most `window` drafts, up to the first the target cannot embed (always rejected)."""
        tokens = tokens[:window]
        keep = next((i for i, t in enumerate(tokens) if not 0 <= t < vocab), len(tokens))
        if q is not None:
            q = fit_vocab(q[:len(tokens)], vocab)
        cut_q = q[keep] if q is not None and keep < len(tokens) else None
        return cls(tokens[:keep], None if q is None else q[:keep],
                   keep + (keep < len(tokens)), cut_q)

    def extend(self, more: _Drafts) -> _Drafts:
        """These drafts, then `more` (drafted after them)."""
        if (self.q is None) != (more.q is None):
            raise AssertionError("a drafter returned q for some proposals and not for others")
        q = None if self.q is None or more.q is None else mx.concatenate([self.q, more.q])
        return _Drafts(self.tokens + more.tokens, q, len(self.tokens) + more.proposed, more.cut_q)

    def cut(self, window: int) -> _Drafts:
        """The first `window` drafts (all of them when there are no more)."""
        if window >= len(self.tokens):
            return self
        return _Drafts(self.tokens[:window], None if self.q is None else self.q[:window], window)


@dataclass(frozen=True)
class _Prepared:
    """A window drafted during the last pass, for the step after it if its guess holds."""

    prefix: list[int]  # the committed sequence it continues: every draft stood, then the guess
    step: _Drafts
    drafted: int  # tokens the drafter proposed for it (the guess included)


def _stage0_share(trace: PassTiming | None) -> float | None:
    """The part of a pass stage 0 computes itself (its layers and the head), from its trace."""
    if trace is None or not trace.total_s:
        return None
    return min(1.0, (trace.local_s + trace.head_s) / trace.total_s)


def _residual(p: mx.array, draft: int, q: mx.array | None) -> mx.array:
    """max(0, p - q), where the step draws from after rejecting `draft` (q None: 1 on it)."""
    vocab = p.shape[-1]
    if q is None:
        residual = mx.where(mx.arange(vocab) == draft, 0.0, p)
    else:
        residual = mx.maximum(p - fit_vocab(q, vocab), 0.0)
    # Empty only through rounding (a rejection needs p(draft) < q(draft)); then p itself.
    return residual if float(residual.sum().item()) > 0 else p


def generate(target: Target, prompt: list[int], params: SamplingParams, *,
             drafter: Drafter | None = None, policy: WindowPolicy | None = None,
             context_length: int | None = None, prefill_step: int = PREFILL_STEP,
             first_token_first: bool = True,
             on_step: Callable[[StepRecord], None] | None = None, overlap: bool = False,
             run_ahead: bool = False, window_cap: Callable[[int, float], int] | None = None,
             tree: TreeShape | TreePolicy | None = None) -> Generation:
    """Stream tokens for `prompt` from `target` (an empty session), with drafts when a drafter
    and a window policy are given, plainly otherwise; `overlap` drafts each next window while
    the target verifies, `run_ahead` also sends it before the verdict; `tree` verifies a
    drafted tree of that shape (or of the shape a tree policy picks) instead of a chain."""
    return Generation(target, list(prompt), params, drafter or NoDrafter(), policy or NoDrafting(),
                      context_length, prefill_step, first_token_first, on_step, overlap or run_ahead,
                      run_ahead, window_cap, FixedTree(tree) if isinstance(tree, TreeShape) else tree)


def compress_windows(windows: list[int]) -> list[list[int]]:
    """Windows step by step as [window, steps in a row] pairs: [4, 4, 4, 0] -> [[4, 3], [0, 1]]."""
    runs: list[list[int]] = []
    for window in windows:
        if runs and runs[-1][0] == window:
            runs[-1][1] += 1
        else:
            runs.append([window, 1])
    return runs
