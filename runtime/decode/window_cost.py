"""The `auto` draft window: the size that maximises expected tokens per second, from measured costs.

Inputs, measured as the server runs (`SpeculationCosts`, shared by its requests, to which the
decode loop hands each step's `StepMeasurement`, and each request's own acceptance):

- `c`: seconds the drafter takes per draft token;
- `V(n) = a + b·n`: seconds of one target pass over n positions (every stage, every round
  trip, stage 0's head), fitted to the passes measured; `f`: the share of a pass that stage
  0 computes itself (its layers and the head), which drafting cannot overlap;
- `α_i`: the chance that draft i stands once drafts 1..i-1 stood (per position, decayed,
  pulled towards the request's and then the server's mean by a few pseudo-counts);
  `β`: the chance that the drafter's guess of the target's next token holds.

For a window w:

    tokens(w) = 1 + Σ_{k=1..w} Π_{i≤k} α_i          expected tokens per pass
    t(w)      = c·w + V(w+1)                         seconds per pass without overlap
    gain(w)   = tokens(w) / t(w) · V(1)              against plain decoding

With overlap, stage 0 drafts the next window (the guess of the target's next token, then
up to w drafts) during the part of the pass it does not compute, R = (1 − f)·V(w+1), until
the answer is there, but at least the guess and one draft: k = min(w + 1, max(2, R / c))
tokens. The window is used when every draft and the guess stood, with P_hit = β·Π_{i≤w} α_i;
the rest of it (w + 1 − k drafts) is drafted then, and after a miss all w are:

    t(w) = V(w+1) + max(0, f·V(w+1) + c·k − V(w+1)) + P_hit·c·(w + 1 − k) + (1 − P_hit)·c·w

The policy drafts w* = argmax gain(w) over [min_window, max_window]. When gain(w*) < 1 it
stops drafting for `off_steps` plain steps (doubling after each consecutive loss, up to
`max_off_steps`), then probes one step at min_window and decides again; since its counts
decay during the plain steps, a probe weighs fresh evidence against the server's mean.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

FORMULA = ("gain(w) = tokens(w) / t(w) * V(1); tokens(w) = 1 + sum_{k<=w} prod_{i<=k} alpha_i; "
           "V(n) = a + b*n; t(w) = c*w + V(w+1) without overlap; with overlap "
           "t(w) = V(w+1) + max(0, f*V(w+1) + c*k - V(w+1)) + hit*c*(w+1-k) + (1-hit)*c*w, "
           "k = min(w+1, max(2, (1-f)*V(w+1)/c)), hit = beta*prod_{i<=w} alpha_i")

PASS_SAMPLES = 48  # recent passes the fit of V(n) uses
PER_POSITION_PRIOR = 0.1  # b = this x a while passes of one size only were measured
PSEUDO_COUNTS = 2.0  # how much the request's and the server's mean weigh against what a position saw
DECAY = 0.9  # per step: older evidence of acceptance fades
DEFAULT_ACCEPT_PRIOR = 0.5  # the server's mean before any request was measured


class _Mean:
    """An exponentially weighted mean (None until the first sample)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (1 - self.weight) * self.value + self.weight * sample


@dataclass(frozen=True)
class PassCost:
    """V(n) = fixed_s + per_position_s * n."""

    fixed_s: float
    per_position_s: float

    def __call__(self, positions: int) -> float:
        return self.fixed_s + self.per_position_s * positions


@dataclass(frozen=True)
class StepMeasurement:
    """What one decode step measured: the window policy learns from it, the cost model from its
    seconds (None where the step did not measure them)."""

    drafted: int  # drafts proposed for verification
    accepted: int  # of those, accepted
    seconds: float  # drafting and verifying
    committed: int  # tokens the step committed
    positions: int = 0  # fed to the target: the last token plus the drafts
    draft_s: float | None = None  # the drafter's seconds for `draft_tokens`
    draft_tokens: int = 0
    pass_s: float | None = None  # the pass's own seconds over `positions`, when nothing hid them
    stage0_share: float | None = None  # of the pass, what stage 0 computed itself
    guessed: bool | None = None  # the guess of the target's next token held (None: none tested)
    prepare_s: float | None = None  # the drafter's seconds for `prepare_tokens`, while the pass ran
    prepare_tokens: int = 0


class SpeculationCosts:
    """What drafting and target passes cost on this server, measured by every request; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._draft = _Mean()
        self._draft_depth = _Mean()  # a tree's drafting, per depth (one draft call per depth)
        self._share = _Mean()
        self._accept = _Mean(0.1)
        self._passes: deque[tuple[int, float]] = deque(maxlen=PASS_SAMPLES)
        self.last_choice: WindowChoice | None = None
        self.last_tree_choice: TreeChoice | None = None

    def record_draft(self, tokens: int, seconds: float) -> None:
        """The drafter took `seconds` for `tokens` draft tokens."""
        if tokens > 0 and seconds > 0:
            with self._lock:
                self._draft.add(seconds / tokens)

    def record_tree_draft(self, depths: int, seconds: float) -> None:
        """The drafter took `seconds` to draft a tree `depths` deep."""
        if depths > 0 and seconds > 0:
            with self._lock:
                self._draft_depth.add(seconds / depths)

    def record_pass(self, positions: int, seconds: float, stage0_share: float | None) -> None:
        """A target pass over `positions` took `seconds`, stage 0's own share of it `stage0_share`."""
        if positions > 0 and seconds > 0:
            with self._lock:
                self._passes.append((positions, seconds))
                if stage0_share is not None:
                    self._share.add(stage0_share)

    def record_step(self, step: StepMeasurement) -> None:
        """The drafting and pass seconds a decode step measured."""
        if step.draft_s is not None:
            self.record_draft(step.draft_tokens, step.draft_s)
        if step.prepare_s is not None:
            self.record_draft(step.prepare_tokens, step.prepare_s)
        if step.pass_s is not None:
            self.record_pass(step.positions, step.pass_s, step.stage0_share)

    def record_accept_rate(self, rate: float) -> None:
        """A request's acceptance so far: the mean that new requests start from."""
        with self._lock:
            self._accept.add(rate)

    @property
    def draft_s_per_token(self) -> float | None:
        return self._draft.value

    @property
    def draft_s_per_depth(self) -> float | None:
        """A tree's drafting per depth; a chain's per token until a tree was drafted."""
        return self._draft_depth.value if self._draft_depth.value is not None else self._draft.value

    @property
    def stage0_share(self) -> float:
        """f: 1 (nothing overlaps) until a pass's trace said otherwise."""
        return self._share.value if self._share.value is not None else 1.0

    @property
    def accept_prior(self) -> float:
        return self._accept.value if self._accept.value is not None else DEFAULT_ACCEPT_PRIOR

    def pass_cost(self) -> PassCost | None:
        """V(n) fitted by least squares to the mean of each size measured; None before any pass."""
        with self._lock:
            samples = list(self._passes)
        return fit_pass_cost(samples)

    def to_json(self) -> dict[str, Any]:
        cost = self.pass_cost()
        choice = self.last_choice
        return {"formula": FORMULA,
                "draft_s_per_token": _round(self.draft_s_per_token),
                "pass_fixed_s": _round(cost.fixed_s if cost else None),
                "pass_per_position_s": _round(cost.per_position_s if cost else None),
                "stage0_share": round(self.stage0_share, 4), "accept_prior": round(self.accept_prior, 4),
                "last_choice": choice.to_json() if choice is not None else None,
                **({"tree_formula": TREE_FORMULA, "draft_s_per_depth": _round(self.draft_s_per_depth),
                    "last_tree_choice": tree.to_json()} if (tree := self.last_tree_choice) else {})}


def fit_pass_cost(samples: list[tuple[int, float]]) -> PassCost | None:
    """V(n) = a + b·n fitted by least squares to the mean seconds of each size n measured (None
    before any); from passes of one size only, b is PER_POSITION_PRIOR·a."""
    if not samples:
        return None
    by_size: dict[int, list[float]] = {}
    for n, seconds in samples:
        by_size.setdefault(n, []).append(seconds)
    points = [(n, sum(v) / len(v)) for n, v in by_size.items()]
    if len(points) == 1:
        n, seconds = points[0]
        fixed = seconds / (1 + PER_POSITION_PRIOR * n)
        return PassCost(fixed, PER_POSITION_PRIOR * fixed)
    mean_n = sum(n for n, _ in points) / len(points)
    mean_s = sum(s for _, s in points) / len(points)
    slope = (sum((n - mean_n) * (s - mean_s) for n, s in points)
             / sum((n - mean_n) ** 2 for n, _ in points))
    slope = max(0.0, slope)  # noise must not make longer passes look cheaper
    return PassCost(max(1e-6, mean_s - slope * mean_n), slope)


def _round(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None


@dataclass(frozen=True)
class WindowChoice:
    """One decision of the auto policy and its inputs."""

    window: int  # 0: drafting off
    gain: float | None  # expected tokens/s against plain decoding, at `window` (or the best window)
    tokens_per_pass: float | None
    seconds_per_pass: float | None
    accept_by_position: tuple[float, ...] = ()
    guess_rate: float | None = None
    reason: str = ""
    gains: dict[int, float] = field(default_factory=dict)  # every window considered

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["accept_by_position"] = [round(a, 4) for a in self.accept_by_position]
        data["gains"] = {str(w): round(g, 4) for w, g in self.gains.items()}
        for key in ("gain", "tokens_per_pass", "seconds_per_pass", "guess_rate"):
            if data[key] is not None:
                data[key] = round(data[key], 4)
        return data


def expected(window: int, alphas: list[float], beta: float, draft_s: float, cost: PassCost,
             stage0_share: float, overlap: bool) -> tuple[float, float]:
    """(tokens per pass, seconds per pass) expected at `window` (the formula in this module's docstring)."""
    tokens, stood = 1.0, 1.0
    for k in range(window):
        stood *= alphas[k]
        tokens += stood
    verify = cost(window + 1)
    if window == 0:
        return 1.0, verify
    if not overlap:
        return tokens, draft_s * window + verify
    hit = beta * stood
    away = (1 - stage0_share) * verify  # the part of the pass stage 0 does not compute
    during = min(window + 1.0, max(2.0, away / draft_s)) if draft_s > 0 else window + 1.0
    seconds = (verify + max(0.0, stage0_share * verify + draft_s * during - verify)
               + hit * draft_s * (window + 1 - during) + (1 - hit) * draft_s * window)
    return tokens, seconds


@dataclass
class AcceptCounts:
    """A request's evidence of acceptance: per draft position, and for the guessed next token."""

    prior: float  # the server's mean when the request started
    tried: list[float] = field(default_factory=list)  # index i: draft i+1 was verified
    stood: list[float] = field(default_factory=list)
    guesses: float = 0.0
    guesses_held: float = 0.0

    def add(self, drafted: int, accepted: int) -> None:
        while len(self.tried) < drafted:
            self.tried.append(0.0)
            self.stood.append(0.0)
        for i in range(min(drafted, accepted + 1)):
            self.tried[i] += 1
            self.stood[i] += i < accepted

    def add_guess(self, held: bool) -> None:
        self.guesses += 1
        self.guesses_held += held

    def decay(self) -> None:
        self.tried = [t * DECAY for t in self.tried]
        self.stood = [s * DECAY for s in self.stood]
        self.guesses *= DECAY
        self.guesses_held *= DECAY

    def mean(self) -> float:
        """The request's acceptance, pulled towards the server's mean."""
        return (sum(self.stood) + PSEUDO_COUNTS * self.prior) / (sum(self.tried) + PSEUDO_COUNTS)

    def alphas(self, positions: int) -> list[float]:
        mean = self.mean()
        out = []
        for i in range(positions):
            tried = self.tried[i] if i < len(self.tried) else 0.0
            stood = self.stood[i] if i < len(self.stood) else 0.0
            out.append((stood + PSEUDO_COUNTS * mean) / (tried + PSEUDO_COUNTS))
        return out

    def guess_rate(self) -> float:
        return (self.guesses_held + PSEUDO_COUNTS * self.mean()) / (self.guesses + PSEUDO_COUNTS)


def choose_window(counts: AcceptCounts, costs: SpeculationCosts, min_window: int, max_window: int, *,
                  overlap: bool, min_gain: float = 1.0) -> WindowChoice | None:
    """The window with the best expected gain, or 0 below `min_gain`; None until costs are measured."""
    draft_s, cost = costs.draft_s_per_token, costs.pass_cost()
    if draft_s is None or cost is None:
        return None
    alphas = counts.alphas(max_window)
    beta = counts.guess_rate()
    plain = cost(1)
    gains = {}
    for window in range(min_window, max_window + 1):
        tokens, seconds = expected(window, alphas, beta, draft_s, cost, costs.stage0_share, overlap)
        gains[window] = tokens / seconds * plain
    best = max(gains, key=lambda w: gains[w])
    tokens, seconds = expected(best, alphas, beta, draft_s, cost, costs.stage0_share, overlap)
    if gains[best] < min_gain:
        return WindowChoice(0, gains[best], tokens, seconds, tuple(alphas[:best]), beta,
                            f"expected gain {gains[best]:.2f}x < {min_gain:.2f}x at the best window {best}",
                            gains)
    return WindowChoice(best, gains[best], tokens, seconds, tuple(alphas[:best]), beta,
                        f"expected gain {gains[best]:.2f}x at window {best}", gains)


# ---------------------------------------------------------------- token trees

TREE_FORMULA = ("gain(D, W) = tokens(D, W) / t(D, W) * V(1); tokens = 1 + sum_{d<=D} prod_{i<=d} p_i(W); "
                "p_d(W) = 1 - (1 - alpha_d) * miss(W) / miss(1), miss(W) = 1 - top_W; "
                "t = c_depth * D + V(1 + n), n = min(D * W, nodes); with B sessions sharing the pass: "
                "gain = (B - 1 + tokens) / (V_B(B + n) + c_depth * D) * V_B(B) / B")
RANK_MISS_PRIOR = 0.75  # without a calibration: each more candidate per depth leaves this share of misses


@dataclass(frozen=True)
class TreeAcceptance:
    """What a tree step's path is expected to reach: chain acceptance by depth, and how much of
    a chain's misses w candidates per depth still miss."""

    by_depth: tuple[float, ...]  # [d-1]: P(depth d of a chain stands | depth d-1 did)
    top_r: tuple[float, ...] = ()  # [r-1]: P(the target's token is among the draft's top r); () unknown

    def miss_share(self, width: int) -> float:
        """miss(W) / miss(1): of a chain's misses at a depth, the share W candidates still miss."""
        if len(self.top_r) >= 2 and self.top_r[0] < 1:
            top = self.top_r[min(width, len(self.top_r)) - 1]
            return max(0.0, (1 - top) / (1 - self.top_r[0]))
        return RANK_MISS_PRIOR ** (width - 1)

    def continue_rate(self, depth: int, width: int) -> float:
        """p_d(W): the path goes on at `depth` (1-based) with `width` candidates per depth."""
        alpha = self.by_depth[min(depth, len(self.by_depth)) - 1] if self.by_depth else DEFAULT_ACCEPT_PRIOR
        return 1 - (1 - alpha) * self.miss_share(width)


@dataclass(frozen=True)
class TreeChoice:
    """One decision of the auto tree: its shape (depth 0: no drafting) and why."""

    depth: int
    width: int
    nodes: int  # drafted nodes at most
    gain: float | None
    tokens_per_pass: float | None
    seconds_per_pass: float | None
    sessions: int = 1  # sessions sharing the pass when it was chosen
    reason: str = ""
    gains: dict[str, float] = field(default_factory=dict)  # "DxW" -> gain, every shape considered

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["gains"] = {k: round(g, 4) for k, g in self.gains.items()}
        for key in ("gain", "tokens_per_pass", "seconds_per_pass"):
            if data[key] is not None:
                data[key] = round(data[key], 4)
        return data


def tree_tokens(depth: int, width: int, rates: list[list[float]]) -> float:
    """Expected tokens per pass of a tree: 1 + Σ_d Π_{i≤d} p_i(W), `rates[W-1][d-1]` = p_d(W)."""
    tokens, reach = 1.0, 1.0
    for d in range(depth):
        reach *= rates[width - 1][d]
        tokens += reach
    return tokens


def choose_tree(rates: list[list[float]], cost: PassCost, draft_s_per_depth: float, *,
                max_nodes: int, sessions: int = 1, min_gain: float = 1.0) -> TreeChoice:
    """The (depth, width) of best expected gain (TREE_FORMULA) over every depth and width that
    `rates` covers (`rates[W-1][d-1]` = p_d(W)), or depth 0 below `min_gain`. With `sessions` > 1
    `cost` is the batch pass's by its rows, and the tree's nodes are rows beside the others'."""
    others = sessions - 1
    plain = cost(sessions) / sessions  # seconds per token of a plain batch pass
    gains: dict[str, float] = {}
    best: tuple[float, int, int, float, float] | None = None
    for width in range(1, len(rates) + 1):
        for depth in range(1, len(rates[width - 1]) + 1):
            nodes = min(depth * width, max_nodes)
            if nodes < depth:
                continue
            tokens = tree_tokens(depth, width, rates)
            seconds = cost(sessions + nodes) + draft_s_per_depth * depth
            gain = (others + tokens) / seconds * plain
            gains[f"{depth}x{width}"] = gain
            if best is None or gain > best[0] * (1 + 1e-9):
                best = (gain, depth, width, tokens, seconds)
    assert best is not None, "rates must cover at least depth 1 at width 1"
    gain, depth, width, tokens, seconds = best
    if gain < min_gain:
        return TreeChoice(0, 0, 0, gain, tokens, seconds, sessions, f"expected gain {gain:.2f}x < "
                          f"{min_gain:.2f}x at the best tree {depth}x{width}", gains)
    kind = "chain" if width == 1 else "tree"
    return TreeChoice(depth, width, min(depth * width, max_nodes), gain, tokens, seconds, sessions,
                      f"expected gain {gain:.2f}x with a {kind} of depth {depth}, width {width}", gains)
