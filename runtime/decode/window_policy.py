"""How many tokens to draft next: a fixed window, one that adapts, or one sized by measured
cost (`auto`, window_cost.py), with a gate that turns drafting off when it costs more than
it saves.

Adaptive window rule, after a step that drafted `d > 0` tokens of which `n` were accepted
(the window `w` always stays in [min_window, max_window]):

- all accepted (`n == d`): `w += 2`. A full acceptance says only "at least w"; growing by a
  constant (as Hugging Face's assisted generation does) probes upwards without betting a
  long window on one lucky step.
- rejected at `n < d`: `w = max(min_window, min(w - 1, ceil((w + n + 1) / 2)))`, halfway to
  the `n + 1` positions that step could use, and at least one smaller. One early rejection
  does not collapse a window that was earning (as jumping to `n + 1` would); repeated ones
  shrink it geometrically (16 → 9 → 5 → 3 → 2), where `w - 1` would take 14 steps.

The gate (adaptive policy only) compares the measured seconds per committed token while
speculating, `(draft_s + verify_s) / tokens` over the recent steps, with the measured seconds
of a plain one-token target pass:

    speedup = plain_s_per_token / speculative_s_per_token
            = tokens_per_pass * plain_s / (draft_s + verify_s)   (acceptance × relative cost)

It needs a plain baseline, so after `measure_steps` speculative steps it runs
`baseline_steps` plain ones (and again every `rebaseline_every` speculative steps, since both
costs grow with the context). Below `min_speedup` drafting goes off for `off_steps` plain
steps (doubling after each consecutive loss, up to `max_off_steps`), then a probe of
`measure_steps` speculative steps decides again. The fixed policy measures the same numbers
but never acts on them.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from layerline.errors import LayerlineError
from layerline.packager.window_spec import WindowSpec

from .window_cost import AcceptCounts, SpeculationCosts, WindowChoice, choose_window

log = logging.getLogger("layerline.speculative")

GROW_ON_FULL_ACCEPTANCE = 2
SAMPLES_KEPT = 8  # recent steps of each kind the gate averages over


@dataclass(frozen=True)
class GateSettings:
    """When the adaptive policy may switch drafting off because it loses time."""

    min_speedup: float = 1.0  # drafting stays on while measured speedup >= this
    measure_steps: int = 4  # speculative steps measured before a decision (and per probe)
    baseline_steps: int = 2  # plain steps that measure the cost of one target pass
    rebaseline_every: int = 64  # speculative steps between fresh baseline measurements
    off_steps: int = 16  # plain steps after a loss before probing again
    max_off_steps: int = 256  # cap of the doubling off period

    def __post_init__(self) -> None:
        if not (self.min_speedup > 0 and self.measure_steps >= 1 and self.baseline_steps >= 1
                and self.rebaseline_every >= 1 and 1 <= self.off_steps <= self.max_off_steps):
            raise LayerlineError(f"invalid speculation gate settings {self}",
                                 hint="use min_speedup > 0, step counts >= 1, "
                                      "off_steps <= max_off_steps")


@dataclass(frozen=True)
class GateDecision:
    """The gate's latest verdict and the measurements behind it (None: not measured yet)."""

    drafting: bool
    reason: str
    accept_rate: float | None = None  # accepted / drafted over the recent speculative steps
    tokens_per_pass: float | None = None  # committed tokens per speculative target pass
    speculative_s_per_token: float | None = None  # (draft + verify seconds) / committed tokens
    plain_s_per_token: float | None = None  # seconds of a plain one-token target pass
    speedup: float | None = None  # plain_s_per_token / speculative_s_per_token

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class WindowPolicy:
    """The draft window of one request (or of a stream of requests, carrying what it measured)."""

    def __init__(self, spec: WindowSpec | None, gate: GateSettings | None = None, *,
                 costs: SpeculationCosts | None = None, overlap: bool = False) -> None:
        """Follow `spec` (validated here); None never drafts. `gate` acts on adaptive specs only
        (an auto spec takes its min_speedup and off periods); `costs` are the measurements shared
        with other requests (the auto policy decides by them), `overlap` whether the loop drafts
        each next window during the pass."""
        self.spec = spec.validate() if spec is not None else None
        self.kind = spec.policy if spec is not None else "off"
        self.initial = spec.initial if spec is not None else 0
        self.min_window = spec.min if spec is not None else 0
        self.max_window = spec.max if spec is not None else 0
        self.gate = gate if self.kind == "adaptive" else None
        self.costs = costs if costs is not None else SpeculationCosts()
        self.overlap = overlap
        self._auto = _AutoState(gate or GateSettings(), AcceptCounts(self.costs.accept_prior)) \
            if self.kind == "auto" else None
        self.window = self.initial  # before clipping to what is left of the request
        self._speculative: deque[tuple[float, int, int, int]] = deque(maxlen=SAMPLES_KEPT)
        self._plain: deque[float] = deque(maxlen=SAMPLES_KEPT)
        self._measured_since_decision = 0
        self._since_baseline = 0
        self._plain_due = 0  # baseline steps still to run
        self._off_left = 0  # plain steps left in an off period
        self._losses = 0  # consecutive decisions that switched drafting off
        self.decision = GateDecision(self.kind != "off", {"fixed": "fixed window", "adaptive": "measuring",
                                                          "auto": "measuring costs",
                                                          "off": "not speculating"}[self.kind])

    @classmethod
    def fixed(cls, window: int) -> WindowPolicy:
        """Always draft `window` tokens (fewer only where the request or context ends)."""
        return cls(WindowSpec.fixed(window))

    @classmethod
    def off(cls) -> WindowPolicy:
        """Never draft: every step is one plain target pass."""
        return cls(None)

    @classmethod
    def adaptive(cls, initial: int, min_window: int, max_window: int, *,
                 gate: GateSettings | None = GateSettings()) -> WindowPolicy:
        """Grow after full acceptance, shrink after rejection; `gate=None` never stops drafting."""
        return cls(WindowSpec("adaptive", initial, min_window, max_window), gate)

    @classmethod
    def auto(cls, initial: int, min_window: int, max_window: int, *, costs: SpeculationCosts | None = None,
             overlap: bool = False, gate: GateSettings = GateSettings()) -> WindowPolicy:
        """The window that maximises expected tokens per second from measured costs (window_cost.py)."""
        return cls(WindowSpec("auto", initial, min_window, max_window), gate, costs=costs, overlap=overlap)

    @classmethod
    def for_spec(cls, spec: WindowSpec, *, costs: SpeculationCosts | None = None,
                 overlap: bool = False) -> WindowPolicy:
        """The policy a speculation setup names, the adaptive one with the default gate."""
        return cls(spec, GateSettings(), costs=costs, overlap=overlap)

    def next_window(self, limit: int, *, gated: bool = True) -> int:
        """Tokens to draft in the next step: 0 while the gate holds drafting off, never above `limit`.

        `gated=False` ignores the gate (seeded sampled requests do, so that wall-clock
        timings cannot change which steps speculate and so the text a seed gives).
        """
        if gated and self.gate is not None and (self._off_left or self._plain_due):
            return 0
        auto = self._auto
        if auto is not None:
            if not gated:
                return max(0, min(self.initial, limit))
            if auto.off_left:
                return 0
            return max(0, min(self._auto_window(), limit))
        return max(0, min(self.window, limit))

    def _auto_window(self) -> int:
        auto = self._auto
        assert auto is not None
        if auto.probing:
            return self.min_window
        return auto.choice.window if auto.choice is not None else self.initial

    def window_after_full_acceptance(self, limit: int, *, gated: bool = True) -> int:
        """The window the next step will draft if the step under way accepts every draft."""
        if self.kind == "adaptive" and not (gated and self.gate is not None
                                            and (self._off_left or self._plain_due)):
            return max(0, min(self.window + GROW_ON_FULL_ACCEPTANCE, self.max_window, limit))
        return self.next_window(limit, gated=gated)

    def record(self, drafted: int, accepted: int, seconds: float, committed: int, *,
               positions: int = 0, draft_s: float | None = None, draft_tokens: int = 0,
               pass_s: float | None = None, stage0_share: float | None = None,
               guessed: bool | None = None, prepare_s: float | None = None,
               prepare_tokens: int = 0) -> None:
        """Learn from one step: tokens drafted and accepted, its draft + verify seconds, tokens committed.

        The keywords feed the cost model: the drafter's seconds for `draft_tokens` (and, while
        the pass ran, `prepare_s` for `prepare_tokens`), the pass's own seconds over
        `positions` when nothing hid them, stage 0's share of it, and whether the guess of
        the target's next token held (None: no guess was tested).
        """
        if draft_s is not None:
            self.costs.record_draft(draft_tokens, draft_s)
        if prepare_s is not None:
            self.costs.record_draft(prepare_tokens, prepare_s)
        if pass_s is not None:
            self.costs.record_pass(positions, pass_s, stage0_share)
        if self._auto is not None:
            self._record_auto(drafted, accepted, guessed)
            return
        if drafted > 0:
            self._speculative.append((seconds, committed, drafted, accepted))
            self._adapt(drafted, accepted)
        elif committed > 0:
            self._plain.append(seconds / committed)
        if self.gate is not None:
            self._step_gate(drafted > 0)
        else:
            self.decision = self._measure(True, self.decision.reason)

    def _record_auto(self, drafted: int, accepted: int, guessed: bool | None) -> None:
        auto = self._auto
        assert auto is not None
        counts = auto.counts
        counts.decay()
        if drafted > 0:
            counts.add(drafted, accepted)
            self.costs.record_accept_rate(accepted / min(drafted, accepted + 1))
        if guessed is not None:
            counts.add_guess(guessed)
        if auto.off_left:
            auto.off_left -= 1
            if not auto.off_left:
                auto.probing = True
                self.decision = GateDecision(True, f"probing at window {self.min_window} after an off period")
            return
        if auto.probing and drafted == 0:
            return  # the probe is still to come
        choice = choose_window(counts, self.costs, self.min_window, self.max_window, overlap=self.overlap,
                               min_gain=auto.gate.min_speedup)
        auto.probing = False
        if choice is None:
            return  # costs not measured yet: the initial window meanwhile
        auto.choice = choice
        self.costs.last_choice = choice
        if choice.window == 0:
            auto.off_left = min(auto.gate.max_off_steps, auto.gate.off_steps * 2 ** auto.losses)
            auto.losses += 1
            log.info("event=speculation_gate policy=auto drafting=off gain=%.2f off_steps=%d",
                     choice.gain or 0.0, auto.off_left)
        else:
            auto.losses = 0
        cost = self.costs.pass_cost()
        plain = cost(1) if cost is not None else None
        per_token = (choice.seconds_per_pass / choice.tokens_per_pass
                     if choice.seconds_per_pass and choice.tokens_per_pass else None)
        reason = choice.reason + (f"; off for {auto.off_left} steps" if choice.window == 0 else "")
        self.decision = GateDecision(choice.window > 0, reason, counts.mean(), choice.tokens_per_pass,
                                     per_token, plain, choice.gain)

    def _adapt(self, drafted: int, accepted: int) -> None:
        if self.kind == "fixed":
            return
        if accepted >= drafted:
            self.window = min(self.max_window, self.window + GROW_ON_FULL_ACCEPTANCE)
        else:
            halfway = math.ceil((self.window + accepted + 1) / 2)
            self.window = max(self.min_window, min(self.window - 1, halfway))

    def _step_gate(self, speculated: bool) -> None:
        gate = self.gate
        assert gate is not None
        if not speculated:
            if self._off_left:
                self._off_left -= 1
                if not self._off_left:  # probe: speculate again and measure afresh
                    self._speculative.clear()
                    self._measured_since_decision = 0
                    self.window = self.initial
                    self.decision = self._measure(True, "probing after an off period")
            elif self._plain_due:
                self._plain_due -= 1
                if not self._plain_due:
                    self._decide()
            return
        self._measured_since_decision += 1
        self._since_baseline += 1
        if self._measured_since_decision < gate.measure_steps:
            return
        if not self._plain or self._since_baseline >= gate.rebaseline_every:
            self._plain_due = gate.baseline_steps
            self._since_baseline = 0
            return
        self._decide()

    def _decide(self) -> None:
        gate = self.gate
        assert gate is not None
        measured = self._measure(True, "")
        if measured.speedup is None:
            return
        if measured.speedup >= gate.min_speedup:
            self._losses = 0
            self.decision = self._measure(True, f"speculation wins ({measured.speedup:.2f}x)")
            return
        off = min(gate.max_off_steps, gate.off_steps * 2 ** self._losses)
        self._losses += 1
        self._off_left = off
        self.decision = self._measure(
            False, f"speculation loses ({measured.speedup:.2f}x < {gate.min_speedup:.2f}x); "
                   f"off for {off} steps")
        log.info("event=speculation_gate drafting=off accept_rate=%.2f tokens_per_pass=%.2f "
                 "speculative_s_per_token=%.4f plain_s_per_token=%.4f speedup=%.2f off_steps=%d",
                 measured.accept_rate or 0.0, measured.tokens_per_pass or 0.0,
                 measured.speculative_s_per_token or 0.0, measured.plain_s_per_token or 0.0,
                 measured.speedup, off)

    def _measure(self, drafting: bool, reason: str) -> GateDecision:
        accept_rate = tokens_per_pass = speculative = plain = speedup = None
        if self._speculative:
            seconds = sum(s for s, _, _, _ in self._speculative)
            tokens = sum(c for _, c, _, _ in self._speculative)
            drafted = sum(d for _, _, d, _ in self._speculative)
            accept_rate = sum(a for _, _, _, a in self._speculative) / drafted
            tokens_per_pass = tokens / len(self._speculative)
            speculative = seconds / tokens
        if self._plain:
            plain = sum(self._plain) / len(self._plain)
        if speculative and plain:
            speedup = plain / speculative
        return GateDecision(drafting, reason, accept_rate, tokens_per_pass, speculative, plain, speedup)


@dataclass
class _AutoState:
    """What the auto policy keeps between steps."""

    gate: GateSettings
    counts: AcceptCounts
    choice: WindowChoice | None = None
    off_left: int = 0  # plain steps left in an off period
    losses: int = 0  # consecutive decisions that switched drafting off
    # The next speculative step drafts min_window to measure afresh: a request's first one too,
    # so text the draft cannot guess costs one small window before the formula has its evidence.
    probing: bool = True
