"""A condition's figures from its measured requests: medians, acceptance, and where a step's time goes.

Acceptance is reported two ways. The server's `accept_rate` is accepted /
drafted: after an early rejection the rest of the window counts as drafted and
not accepted. The formula for tokens per target pass,
(1 - a^(w+1)) / (1 - a) for a fixed window w (Leviathan et al. 2023), takes `a`
as the chance that each *tested* position is accepted: accepted / (accepted +
rejections). That needs each step's size, which the stream shows: a step's
tokens are sent back to back, and steps are separated by a draft and a target
pass. With the number of target passes P known from `usage`, the P - 1 widest
gaps between token arrivals are the step boundaries; if they do not stand
clearly above every gap inside a step, the request is left out of that figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .client import RequestSample

# A step boundary must be this many times wider than the widest gap inside a step.
BOUNDARY_MARGIN = 2.0


def step_sizes(arrivals: Sequence[float], passes: int) -> list[int] | None:
    """Tokens of each target pass, read from token arrival times; None when unclear."""
    n = len(arrivals)
    if passes < 1 or n < passes:
        return None
    if passes == 1:
        return [n]
    gaps = [arrivals[i + 1] - arrivals[i] for i in range(n - 1)]
    widest = sorted(range(n - 1), key=gaps.__getitem__, reverse=True)
    narrowest_boundary = gaps[widest[passes - 2]]
    widest_inside = gaps[widest[passes - 1]] if passes - 1 < n - 1 else 0.0
    if narrowest_boundary <= BOUNDARY_MARGIN * widest_inside:
        return None
    cuts = sorted(i + 1 for i in widest[:passes - 1])
    edges = [0, *cuts, n]
    return [edges[k + 1] - edges[k] for k in range(passes)]


def acceptance_counts(sizes: Sequence[int], window: int, max_tokens: int,
                      finish_reason: str | None) -> tuple[int, int]:
    """(accepted drafts, rejections) of fixed-window steps of these sizes.

    A step drafts min(window, tokens still allowed - 1) and yields its accepted
    drafts plus one token: it was rejected when it yielded fewer than that + 1.
    A last step cut by an end-of-text token says nothing about its drafts.
    """
    accepted = rejections = done = 0
    for k, size in enumerate(sizes):
        if k == len(sizes) - 1 and finish_reason == "stop":
            break
        drafted = max(0, min(window, max_tokens - done - 1))
        accepted += size - 1
        rejections += size - 1 < drafted
        done += size
    return accepted, rejections


def expected_tokens_per_pass(alpha: float, window: int) -> float:
    """(1 - a^(w+1)) / (1 - a): tokens per target pass if each draft stands with chance a."""
    if alpha >= 1.0:
        return float(window + 1)
    return (1 - alpha ** (window + 1)) / (1 - alpha)


def expected_passes(tokens: int, window: int, alpha: float, max_tokens: int) -> float:
    """Expected target passes to yield `tokens`, each step drafting min(window, room left) tokens.

    Near `max_tokens` the server drafts fewer than `window` (it never drafts past the
    limit), so short outputs yield fewer tokens per pass than the formula's long-run value.
    """
    after = [0.0] * (tokens + window + 2)  # after[d]: expected passes still needed with d yielded
    for done in range(tokens - 1, -1, -1):
        drafted = max(0, min(window, max_tokens - done - 1))
        # k drafts accepted: each with chance alpha, until the first rejection or the window's end.
        chances = [alpha ** k * (1 - alpha) for k in range(drafted)] + [alpha ** drafted]
        after[done] = 1 + sum(p * after[min(tokens, done + k + 1)] for k, p in enumerate(chances))
    return after[0]


@dataclass(frozen=True)
class ConditionStats:
    requests: int
    tokens: int
    tokens_per_s: float  # median over requests of completion tokens / wall time
    decode_tokens_per_s: float  # median of (tokens - 1) / (wall - ttft)
    wall_s: float  # median
    ttft_s: float  # median
    accept_rate: float | None  # accepted / drafted, over every measured request
    position_accept_rate: float | None  # accepted / (accepted + rejections): the formula's a
    tokens_per_pass: float | None  # tokens / target passes
    expected_tokens_per_pass: float | None  # the formula at that a, windows cut at max_tokens as served
    formula_tokens_per_pass: float | None  # (1 - a^(w+1)) / (1 - a): the long-run value
    steps_read: int  # requests whose step sizes the stream showed clearly
    # Per target pass, in milliseconds (layerline only).
    pass_ms: float | None  # draft + verify
    draft_ms: float | None
    verify_ms: float | None  # the target's pass over every stage, plus the acceptance decision
    link_ms: float | None  # of verify: the emulated link delay, 2 x delay x links
    outside_ms: float | None  # wall time outside draft and verify: prefill, HTTP, detokenizing

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(samples: Sequence[RequestSample], *, window: int | None, max_tokens: int,
              link_round_trip_ms: float = 0.0) -> ConditionStats:
    """The condition's figures from its measured requests.

    `window` is the fixed draft window (None when adaptive or not speculating);
    `link_round_trip_ms` the emulated delay one target pass crosses.
    """
    if not samples:
        raise ValueError("no measured requests to summarize")
    median = statistics.median
    spec = [s.speculative for s in samples]
    drafted = sum(int(u.get("drafted") or 0) for u in spec)
    accepted = sum(int(u.get("accepted") or 0) for u in spec)
    passes = sum(int(u.get("target_passes") or 0) for u in spec)
    tokens = sum(s.tokens for s in samples)
    draft_s = sum(float(u.get("draft_seconds") or 0.0) for u in spec)
    verify_s = sum(float(u.get("verify_seconds") or 0.0) for u in spec)
    if not drafted:  # llama-server reports its own counters
        timings = [s.timings or {} for s in samples]
        drafted = sum(int(t.get("draft_n") or 0) for t in timings)
        accepted = sum(int(t.get("draft_n_accepted") or 0) for t in timings)

    position_rate = expected = formula = None
    steps_read = 0
    if window is not None and drafted:
        counted = [0, 0]
        for s, u in zip(samples, spec, strict=True):
            sizes = step_sizes(s.arrivals, int(u.get("target_passes") or 0)) \
                if len(s.arrivals) == s.tokens else None
            if sizes is None:
                continue
            steps_read += 1
            a, r = acceptance_counts(sizes, window, max_tokens, s.finish_reason)
            counted[0] += a
            counted[1] += r
        if sum(counted):
            position_rate = counted[0] / sum(counted)
            formula = expected_tokens_per_pass(position_rate, window)
            passes_expected = sum(expected_passes(s.tokens, window, position_rate, max_tokens)
                                  for s in samples)
            expected = tokens / passes_expected if passes_expected else None

    wall = sum(s.wall_s for s in samples)
    per_pass = (lambda seconds: seconds * 1000 / passes) if passes else (lambda seconds: None)
    return ConditionStats(
        requests=len(samples), tokens=tokens,
        tokens_per_s=median(s.tokens_per_s for s in samples),
        decode_tokens_per_s=median(s.decode_tokens_per_s for s in samples),
        wall_s=median(s.wall_s for s in samples), ttft_s=median(s.ttft_s for s in samples),
        accept_rate=_ratio(accepted, drafted) if drafted else None,
        position_accept_rate=position_rate,
        tokens_per_pass=_ratio(tokens, passes) if passes else None,
        expected_tokens_per_pass=expected, formula_tokens_per_pass=formula, steps_read=steps_read,
        pass_ms=per_pass(draft_s + verify_s), draft_ms=per_pass(draft_s), verify_ms=per_pass(verify_s),
        link_ms=link_round_trip_ms if passes else None,
        outside_ms=per_pass(wall - draft_s - verify_s))


# ---------------------------------------------------------------- many clients at once


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolated between the nearest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def solo_answers(samples: Sequence[RequestSample]) -> dict[int, str]:
    """Each prompt's greedy text as one client alone got it (its first measured answer)."""
    answers: dict[int, str] = {}
    for s in sorted(samples, key=lambda s: (s.run, s.sent_at)):
        answers.setdefault(s.prompt_index, s.text)
    return answers


@dataclass(frozen=True)
class LoadStats:
    """C clients at once: what they got together, and what each of them saw."""

    clients: int
    requests: int
    tokens: int
    wall_s: float  # the first request sent -> the last token received, over every client
    aggregate_tokens_per_s: float  # every client's completion tokens / wall_s
    client_decode_tokens_per_s: float  # median over requests of (tokens - 1) / (wall - ttft)
    ttft_p50_s: float
    ttft_p90_s: float
    same_text: float | None  # share of answers equal to the solo answer of the same prompt
    mismatches: tuple[tuple[int, int, int], ...] = ()  # (client, run, prompt) of the answers that differ

    def to_json(self) -> dict[str, Any]:
        body = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        body["mismatches"] = [{"client": c, "run": r, "prompt_index": p} for c, r, p in self.mismatches]
        return body


def summarize_load(samples: Sequence[RequestSample], *, clients: int,
                   solo: dict[int, str]) -> LoadStats:
    """The figures of `clients` concurrent clients from their requests; `solo` from solo_answers()."""
    if not samples:
        raise ValueError("no measured requests to summarize")
    wall = max(s.last_token_at for s in samples) - min(s.sent_at for s in samples)
    tokens = sum(s.tokens for s in samples)
    compared = [s for s in samples if s.prompt_index in solo]
    mismatches = tuple((s.client, s.run, s.prompt_index) for s in compared if s.text != solo[s.prompt_index])
    ttfts = [s.ttft_s for s in samples]
    return LoadStats(
        clients=clients, requests=len(samples), tokens=tokens, wall_s=wall,
        aggregate_tokens_per_s=tokens / wall if wall > 0 else 0.0,
        client_decode_tokens_per_s=statistics.median(s.decode_tokens_per_s for s in samples),
        ttft_p50_s=percentile(ttfts, 50), ttft_p90_s=percentile(ttfts, 90),
        same_text=1 - len(mismatches) / len(compared) if compared else None, mismatches=mismatches)
