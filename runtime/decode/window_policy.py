"""How many tokens to draft next: a fixed window (`FixedWindow`), one that adapts
(`AdaptiveWindow`), or one sized by measured cost (`AutoWindow`, window_cost.py), with a gate
that turns drafting off when it costs more than it saves; `NoDrafting` never drafts.
`policy_for(spec)` builds the one a `WindowSpec` names. Every policy learns from one
`StepMeasurement` per step; the loop hands the same measurement to the cost model.

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
costs grow with the context). Below `min_speedup` drafting goes off for an `OffPeriod` of
`off_steps` plain steps (doubling after each consecutive loss, up to `max_off_steps`; the auto
policy's off periods are the same), then a probe of `measure_steps` speculative steps decides
again. The fixed policy measures the same numbers but never acts on them.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from layerline.errors import LayerlineError
from layerline.packager.window_spec import WindowSpec

from .window_cost import AcceptCounts, SpeculationCosts, StepMeasurement, WindowChoice, choose_window

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


class WindowPolicy(Protocol):
    """The draft window of one request (or of a stream of requests, carrying what it measured)."""

    kind: str  # the policy's name as a WindowSpec gives it ("off": never drafts), for logs and usage
    drafts: bool  # False: every step is one plain target pass
    costs: SpeculationCosts  # what drafting and passes cost, fed by the loop; maybe shared by requests
    decision: GateDecision  # the latest verdict on drafting and the measurements behind it

    def next_window(self, limit: int, *, gated: bool = True) -> int:
        """Tokens to draft in the next step: 0 while drafting is off, never above `limit`.

        `gated=False` ignores what timings decided (seeded sampled requests do, so that
        wall-clock timings cannot change which steps speculate and so the text a seed gives).
        """
        ...

    def window_after_full_acceptance(self, limit: int, *, gated: bool = True) -> int:
        """The window the next step will draft if the step under way accepts every draft."""
        ...

    def record(self, step: StepMeasurement) -> None:
        """Learn from one step."""
        ...


def policy_for(spec: WindowSpec | None, *, costs: SpeculationCosts | None = None,
               overlap: bool = False) -> WindowPolicy:
    """The policy `spec` names (validated here; None never drafts), the adaptive one with the
    default gate; `costs` are the measurements shared with other requests, `overlap` whether
    the loop drafts each next window during the pass (the auto policy decides by both)."""
    if spec is None:
        return NoDrafting(costs=costs)
    spec = spec.validate()
    if spec.policy == "fixed":
        return FixedWindow(spec.initial, costs=costs)
    if spec.policy == "adaptive":
        return AdaptiveWindow(spec.initial, spec.min, spec.max, costs=costs)
    return AutoWindow(spec.initial, spec.min, spec.max, costs=costs, overlap=overlap)


@dataclass
class OffPeriod:
    """Plain steps after a loss before probing again: `off_steps`, doubling after each
    consecutive loss up to `max_off_steps`."""

    gate: GateSettings
    left: int = 0  # plain steps left in the period
    losses: int = 0  # consecutive decisions that switched drafting off

    @property
    def active(self) -> bool:
        """Whether drafting is off now."""
        return self.left > 0

    def start(self) -> int:
        """Drafting lost: switch it off; the plain steps it stays off."""
        self.left = min(self.gate.max_off_steps, self.gate.off_steps * 2 ** self.losses)
        self.losses += 1
        return self.left

    def won(self) -> None:
        """Drafting won: the next loss starts from `off_steps` again."""
        self.losses = 0

    def tick(self) -> bool:
        """Count one plain step of the period; True when it ends (time to probe)."""
        self.left -= 1
        return self.left == 0


class MeasuredSteps:
    """Seconds per committed token of the recent speculative and of the recent plain steps."""

    def __init__(self) -> None:
        self._speculative: deque[StepMeasurement] = deque(maxlen=SAMPLES_KEPT)
        self._plain: deque[float] = deque(maxlen=SAMPLES_KEPT)

    @property
    def has_plain(self) -> bool:
        """Whether a plain step was measured (the gate's baseline)."""
        return bool(self._plain)

    def add(self, step: StepMeasurement) -> None:
        """Keep a step that drafted, or a plain step's seconds per token."""
        if step.drafted > 0:
            self._speculative.append(step)
        elif step.committed > 0:
            self._plain.append(step.seconds / step.committed)

    def forget_speculative(self) -> None:
        """Drop the speculative steps: a probe measures afresh."""
        self._speculative.clear()

    def decision(self, drafting: bool, reason: str) -> GateDecision:
        """`drafting` and `reason`, with what the recent steps measured."""
        accept_rate = tokens_per_pass = speculative = plain = speedup = None
        if self._speculative:
            seconds = sum(s.seconds for s in self._speculative)
            tokens = sum(s.committed for s in self._speculative)
            drafted = sum(s.drafted for s in self._speculative)
            accept_rate = sum(s.accepted for s in self._speculative) / drafted
            tokens_per_pass = tokens / len(self._speculative)
            speculative = seconds / tokens
        if self._plain:
            plain = sum(self._plain) / len(self._plain)
        if speculative and plain:
            speedup = plain / speculative
        return GateDecision(drafting, reason, accept_rate, tokens_per_pass, speculative, plain, speedup)


class NoDrafting:
    """Never draft: every step is one plain target pass (its seconds are measured all the same)."""

    kind = "off"
    drafts = False

    def __init__(self, *, costs: SpeculationCosts | None = None) -> None:
        self.costs = costs if costs is not None else SpeculationCosts()
        self.decision = GateDecision(False, "not speculating")
        self._steps = MeasuredSteps()

    def next_window(self, limit: int, *, gated: bool = True) -> int:
        """Always 0."""
        return 0

    def window_after_full_acceptance(self, limit: int, *, gated: bool = True) -> int:
        """Always 0."""
        return 0

    def record(self, step: StepMeasurement) -> None:
        """Measure the plain step."""
        self._steps.add(step)
        self.decision = self._steps.decision(False, self.decision.reason)


class FixedWindow:
    """Always draft `window` tokens (fewer only where the request or context ends)."""

    kind = "fixed"
    drafts = True

    def __init__(self, window: int, *, costs: SpeculationCosts | None = None) -> None:
        WindowSpec.fixed(window).validate()
        self.window = window
        self.costs = costs if costs is not None else SpeculationCosts()
        self.decision = GateDecision(True, "fixed window")
        self._steps = MeasuredSteps()

    def next_window(self, limit: int, *, gated: bool = True) -> int:
        """The window, never above `limit`."""
        return max(0, min(self.window, limit))

    def window_after_full_acceptance(self, limit: int, *, gated: bool = True) -> int:
        """The same window."""
        return self.next_window(limit)

    def record(self, step: StepMeasurement) -> None:
        """Measure the step (the window never changes)."""
        self._steps.add(step)
        self.decision = self._steps.decision(True, self.decision.reason)


class AdaptiveWindow:
    """Grow after full acceptance, shrink after rejection (the rule in the module's docstring);
    the gate switches drafting off while it loses time, `gate=None` never does."""

    kind = "adaptive"
    drafts = True

    def __init__(self, initial: int, min_window: int, max_window: int, *,
                 gate: GateSettings | None = GateSettings(), costs: SpeculationCosts | None = None) -> None:
        WindowSpec(self.kind, initial, min_window, max_window).validate()
        self.initial, self.min_window, self.max_window = initial, min_window, max_window
        self.gate = gate
        self.costs = costs if costs is not None else SpeculationCosts()
        self.window = initial  # before clipping to what is left of the request
        self.decision = GateDecision(True, "measuring")
        self._steps = MeasuredSteps()
        self._off = OffPeriod(gate or GateSettings())  # never started without a gate
        self._measured_since_decision = 0
        self._since_baseline = 0
        self._plain_due = 0  # baseline steps still to run

    def next_window(self, limit: int, *, gated: bool = True) -> int:
        """The window, or 0 while the gate holds drafting off or measures a baseline."""
        if gated and self._holding:
            return 0
        return max(0, min(self.window, limit))

    def window_after_full_acceptance(self, limit: int, *, gated: bool = True) -> int:
        """The window grown by a full acceptance, or 0 while the gate holds drafting off."""
        if gated and self._holding:
            return 0
        return max(0, min(self.window + GROW_ON_FULL_ACCEPTANCE, self.max_window, limit))

    @property
    def _holding(self) -> bool:
        """Whether the gate runs plain steps now (an off period or a baseline)."""
        return self._off.active or self._plain_due > 0

    def record(self, step: StepMeasurement) -> None:
        """Move the window by the step's acceptance, and let the gate weigh its seconds."""
        self._steps.add(step)
        if step.drafted > 0:
            self._adapt(step.drafted, step.accepted)
        if self.gate is not None:
            self._step_gate(self.gate, step.drafted > 0)
        else:
            self.decision = self._steps.decision(True, self.decision.reason)

    def _adapt(self, drafted: int, accepted: int) -> None:
        if accepted >= drafted:
            self.window = min(self.max_window, self.window + GROW_ON_FULL_ACCEPTANCE)
        else:
            halfway = math.ceil((self.window + accepted + 1) / 2)
            self.window = max(self.min_window, min(self.window - 1, halfway))

    def _step_gate(self, gate: GateSettings, speculated: bool) -> None:
        if not speculated:
            if self._off.active:
                if self._off.tick():  # probe: speculate again and measure afresh
                    self._steps.forget_speculative()
                    self._measured_since_decision = 0
                    self.window = self.initial
                    self.decision = self._steps.decision(True, "probing after an off period")
            elif self._plain_due:
                self._plain_due -= 1
                if not self._plain_due:
                    self._decide(gate)
            return
        self._measured_since_decision += 1
        self._since_baseline += 1
        if self._measured_since_decision < gate.measure_steps:
            return
        if not self._steps.has_plain or self._since_baseline >= gate.rebaseline_every:
            self._plain_due = gate.baseline_steps
            self._since_baseline = 0
            return
        self._decide(gate)

    def _decide(self, gate: GateSettings) -> None:
        measured = self._steps.decision(True, "")
        if measured.speedup is None:
            return
        if measured.speedup >= gate.min_speedup:
            self._off.won()
            self.decision = self._steps.decision(True, f"speculation wins ({measured.speedup:.2f}x)")
            return
        off = self._off.start()
        self.decision = self._steps.decision(
            False, f"speculation loses ({measured.speedup:.2f}x < {gate.min_speedup:.2f}x); "
                   f"off for {off} steps")
        log.info("event=speculation_gate drafting=off accept_rate=%.2f tokens_per_pass=%.2f "
                 "speculative_s_per_token=%.4f plain_s_per_token=%.4f speedup=%.2f off_steps=%d",
                 measured.accept_rate or 0.0, measured.tokens_per_pass or 0.0,
                 measured.speculative_s_per_token or 0.0, measured.plain_s_per_token or 0.0,
                 measured.speedup, off)


class AutoWindow:
    """The window that maximises expected tokens per second from measured costs (window_cost.py);
    below the gate's `min_speedup` drafting goes off for an off period, then a probe at
    `min_window` decides again."""

    kind = "auto"
    drafts = True

    def __init__(self, initial: int, min_window: int, max_window: int, *,
                 costs: SpeculationCosts | None = None, overlap: bool = False,
                 gate: GateSettings = GateSettings()) -> None:
        WindowSpec(self.kind, initial, min_window, max_window).validate()
        self.initial, self.min_window, self.max_window = initial, min_window, max_window
        self.costs = costs if costs is not None else SpeculationCosts()
        self.overlap = overlap  # the loop drafts each next window during the pass
        self.gate = gate
        self.decision = GateDecision(True, "measuring costs")
        self._counts = AcceptCounts(self.costs.accept_prior)
        self._choice: WindowChoice | None = None
        self._off = OffPeriod(gate)
        # The next speculative step drafts min_window to measure afresh: a request's first one too,
        # so text the draft cannot guess costs one small window before the formula has its evidence.
        self._probing = True

    def next_window(self, limit: int, *, gated: bool = True) -> int:
        """The chosen window (min_window while probing, initial until costs are measured), 0 while
        drafting is off; ungated, always the initial window."""
        if not gated:
            return max(0, min(self.initial, limit))
        if self._off.active:
            return 0
        if self._probing:
            window = self.min_window
        else:
            window = self._choice.window if self._choice is not None else self.initial
        return max(0, min(window, limit))

    def window_after_full_acceptance(self, limit: int, *, gated: bool = True) -> int:
        """The window chosen now: a full acceptance only changes it at the next decision."""
        return self.next_window(limit, gated=gated)

    def record(self, step: StepMeasurement) -> None:
        """Count the step's acceptance, and choose the window again from the costs."""
        counts = self._counts
        counts.decay()
        if step.drafted > 0:
            counts.add(step.drafted, step.accepted)
            self.costs.record_accept_rate(step.accepted / min(step.drafted, step.accepted + 1))
        if step.guessed is not None:
            counts.add_guess(step.guessed)
        if self._off.active:
            if self._off.tick():
                self._probing = True
                self.decision = GateDecision(True, f"probing at window {self.min_window} after an off period")
            return
        if self._probing and step.drafted == 0:
            return  # the probe is still to come
        choice = choose_window(counts, self.costs, self.min_window, self.max_window, overlap=self.overlap,
                               min_gain=self.gate.min_speedup)
        self._probing = False
        if choice is None:
            return  # costs not measured yet: the initial window meanwhile
        self._choice = choice
        self.costs.last_choice = choice
        if choice.window == 0:
            off = self._off.start()
            log.info("event=speculation_gate policy=auto drafting=off gain=%.2f off_steps=%d",
                     choice.gain or 0.0, off)
        else:
            self._off.won()
        cost = self.costs.pass_cost()
        plain = cost(1) if cost is not None else None
        per_token = (choice.seconds_per_pass / choice.tokens_per_pass
                     if choice.seconds_per_pass and choice.tokens_per_pass else None)
        reason = choice.reason + (f"; off for {self._off.left} steps" if choice.window == 0 else "")
        self.decision = GateDecision(choice.window > 0, reason, counts.mean(), choice.tokens_per_pass,
                                     per_token, plain, choice.gain)
