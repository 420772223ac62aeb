"""Speculative decoding: a drafter proposes, one target pass verifies, tokens stream out.

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
   temperature), so the output follows exactly the target's sampling distribution;
5. the target and the drafter forget the rejected positions.

Tokens are yielded one at a time: the caller checks its stop strings and may close the
generator in the middle of a step's accepted run; the `finally` then rolls the target and
the drafter back to what was yielded. A stop token id ends the generation (it is yielded).
The target holds every committed token but the last, which the next step feeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx

from .drafters import Drafter
from .generate import check_prompt
from .sampling import SamplingParams, log_softmax
from .targets import Target
from .token_distribution import probabilities, recent_tokens, request_key, scores
from .window_policy import GateDecision, WindowPolicy

log = logging.getLogger("layerline.speculative")

PREFILL_STEP = 512  # prompt positions per target call

# A token's log-probability and the likeliest alternatives (id, log-probability), best first.
TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class SpeculativeToken:
    id: int
    logprob: float | None = None  # the target's log-probability of the token (raw logits)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the likeliest alternatives, best first
    drafted: bool = False  # proposed by the drafter and accepted, else chosen by the target


@dataclass
class SpeculationStats:
    prompt_tokens: int
    tokens: int = 0  # tokens yielded
    drafted: int = 0  # draft tokens sent to the target for verification
    accepted: int = 0  # of those, accepted (whether or not the caller read them all)
    target_passes: int = 0  # verification passes (one per step; prefill not counted)
    draft_seconds: float = 0.0  # in the drafter's propose()
    verify_seconds: float = 0.0  # in target passes after prefill, and deciding on their logits
    prefill_seconds: float = 0.0
    finish_reason: str = ""  # "stop" | "length" | "" (closed by the caller)
    gate: GateDecision | None = None  # the window policy's verdict when the request ended

    @property
    def accept_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens yielded per verification pass of the target."""
        return self.tokens / self.target_passes if self.target_passes else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "drafted": self.drafted,
            "accepted": self.accepted, "accept_rate": round(self.accept_rate, 4),
            "target_passes": self.target_passes, "tokens_per_pass": round(self.tokens_per_pass, 4),
            "draft_seconds": round(self.draft_seconds, 6),
            "verify_seconds": round(self.verify_seconds, 6),
            "prefill_seconds": round(self.prefill_seconds, 6), "finish_reason": self.finish_reason,
            "gate": self.gate.to_json() if self.gate is not None else None,
        }

    def describe(self) -> str:
        """`drafted 40 accepted 31 (78%), 2.9 tok/pass, draft 0.21s verify 0.35s`."""
        return (f"drafted {self.drafted} accepted {self.accepted} ({self.accept_rate:.0%}), "
                f"{self.tokens_per_pass:.1f} tok/pass, draft {self.draft_seconds:.2f}s "
                f"verify {self.verify_seconds:.2f}s")


@dataclass
class SpeculativeGeneration:
    """One request's speculative token stream: iterate for tokens, then read `stats`."""

    target: Target  # an empty session of the target model
    drafter: Drafter
    prompt: list[int]
    params: SamplingParams
    policy: WindowPolicy
    context_length: int | None = None
    prefill_step: int = PREFILL_STEP
    stats: SpeculationStats = field(init=False)
    tokens: list[int] = field(init=False, default_factory=list)  # yielded, in order

    def __post_init__(self) -> None:
        check_prompt(self.prompt, self.context_length)
        self.stats = SpeculationStats(prompt_tokens=len(self.prompt))
        self._key = request_key(self.params.seed, stream=0)
        self._started = False

    def __iter__(self) -> Iterator[SpeculativeToken]:
        if self._started:
            raise RuntimeError("a SpeculativeGeneration runs once; make another for another run")
        self._started = True
        params, stats = self.params, self.stats
        limit = params.max_tokens
        if self.context_length is not None:
            # The last token is never fed: tokens may reach one past the last position.
            limit = min(limit, self.context_length - len(self.prompt) + 1)
        stop_ids = set(params.stop_token_ids)
        # Timings must not decide which steps speculate when a seed must reproduce the text.
        gated = params.greedy or params.seed is None
        committed = list(self.prompt)
        try:
            self._prefill()
            while len(self.tokens) < limit:
                room = limit - len(self.tokens) - 1  # drafts beyond the step's own token
                window = self.policy.next_window(room, gated=gated)
                out, accepted, logprobs = self._step(committed, window)
                for i, token in enumerate(out):
                    committed.append(token)
                    self.tokens.append(token)
                    stats.tokens += 1
                    logprob, top = logprobs[i] if logprobs is not None else (None, ())
                    yield SpeculativeToken(token, logprob, top, drafted=i < accepted)
                    if token in stop_ids:
                        stats.finish_reason = "stop"
                        return
            stats.finish_reason = "length"
        finally:
            # Closed mid-run or not: both sides keep exactly what was yielded.
            self.target.rewind(len(committed) - 1)
            self.drafter.sync(committed)
            stats.gate = self.policy.decision
            log.debug("event=speculation_done tokens=%d drafted=%d accepted=%d passes=%d "
                      "draft_s=%.3f verify_s=%.3f finish=%s", stats.tokens, stats.drafted,
                      stats.accepted, stats.target_passes, stats.draft_seconds,
                      stats.verify_seconds, stats.finish_reason or "closed")

    def _step(self, committed: list[int], window: int) -> tuple[list[int], int, list[TokenLogprobs] | None]:
        """Draft, verify in one target pass, roll back: tokens committed, how many were drafts."""
        stats = self.stats
        started = time.perf_counter()
        drafts, q = self.drafter.propose(committed, window) if window > 0 else ([], None)
        step = _Drafts.usable(drafts, q, window, self.target.vocab_size)
        drafted_at = time.perf_counter()
        logits = self.target.forward([committed[-1], *step.tokens], len(committed) - 1)
        accepted, chosen = self._verify(logits, committed, step)
        out = [*step.tokens[:accepted], chosen]
        logprobs = self._logprobs(logits[:len(out)], out) if self.params.logprobs else None
        # Forget the rejected positions now: everything committed but the last is held.
        self.target.rewind(len(committed) + len(out) - 1)
        self.drafter.sync(committed + out)
        done = time.perf_counter()
        stats.draft_seconds += drafted_at - started
        stats.verify_seconds += done - drafted_at
        stats.target_passes += 1
        stats.drafted += step.proposed
        stats.accepted += accepted
        self.policy.record(step.proposed, accepted, done - started, len(out))
        return out, accepted, logprobs

    def _prefill(self) -> None:
        """Feed the prompt but its last token, which the first step feeds with its drafts."""
        started = time.perf_counter()
        head = self.prompt[:-1]
        for start in range(0, len(head), self.prefill_step):
            self.target.forward(head[start:start + self.prefill_step], start)
        self.stats.prefill_seconds = time.perf_counter() - started

    def _verify(self, logits: mx.array, committed: list[int], step: _Drafts) -> tuple[int, int]:
        """How many drafts stand, and the token the target adds after them."""
        params, drafts = self.params, step.tokens
        # Row i follows committed + d1..di: the penalty looks at those tokens.
        rows = [recent_tokens(committed + drafts[:i], params) for i in range(len(drafts) + 1)]
        if params.greedy:
            penalized = [scores(logits[i:i + 1], recent, params) for i, recent in enumerate(rows)]
            best = mx.argmax(mx.concatenate(penalized), axis=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == best[accepted]:
                accepted += 1
            return accepted, best[accepted]
        p = mx.concatenate([probabilities(logits[i:i + 1], recent, params)
                            for i, recent in enumerate(rows)])
        self._key, accept_key, draw_key = mx.random.split(self._key, 3)
        accepted = len(drafts)
        if drafts:
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

    def _logprobs(self, logits: mx.array, tokens: list[int]) -> list[TokenLogprobs]:
        """Each token's log-probability under its row of raw logits, and the row's top ones."""
        values = log_softmax(logits)
        k = self.params.top_logprobs
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
            q = _fit_vocab(q[:len(tokens)], vocab)
        cut_q = q[keep] if q is not None and keep < len(tokens) else None
        return cls(tokens[:keep], None if q is None else q[:keep],
                   keep + (keep < len(tokens)), cut_q)


def _residual(p: mx.array, draft: int, q: mx.array | None) -> mx.array:
    """max(0, p - q), where the step draws from after rejecting `draft` (q None: 1 on it)."""
    vocab = p.shape[-1]
    if q is None:
        residual = mx.where(mx.arange(vocab) == draft, 0.0, p)
    else:
        residual = mx.maximum(p - _fit_vocab(q, vocab), 0.0)
    # Empty only through rounding (a rejection needs p(draft) < q(draft)); then p itself.
    return residual if float(residual.sum().item()) > 0 else p


def _fit_vocab(row: mx.array, vocab: int) -> mx.array:
    """A draft distribution over the target's vocabulary: cut or zero-padded."""
    size = row.shape[-1]
    if size >= vocab:
        return row[..., :vocab]
    return mx.concatenate([row, mx.zeros((*row.shape[:-1], vocab - size), dtype=row.dtype)], axis=-1)


def speculative_generate(target: Target, drafter: Drafter, prompt: list[int],
                         params: SamplingParams, policy: WindowPolicy, *,
                         context_length: int | None = None,
                         prefill_step: int = PREFILL_STEP) -> SpeculativeGeneration:
    """Stream tokens for `prompt` with drafts verified by `target` (an empty session)."""
    return SpeculativeGeneration(target, drafter, list(prompt), params, policy, context_length,
                                 prefill_step)
