"""The draft window of a speculation setup: one type, one set of defaults, one validator.

A `WindowSpec` names the policy (`fixed`, `adaptive`, or `auto`: sized by measured cost) and
three sizes. The same four
settings go by the same names in a package's strategies, the TOML config, `PUT /v1/draft`
and `layerline config show` (`FIELDS`); a request's own `speculative.window` is one size,
a fixed window. A fixed policy drafts `initial` tokens every step and ignores `min`/`max`;
an auto policy chooses within [min, max] and drafts `initial` until it has measured costs.
A `PartialWindowSpec` holds the settings one source gives (a config table, a `PUT /v1/draft`
body); laid over a `WindowSpec`, it replaces only those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from layerline.errors import LayerlineError

POLICIES = ("adaptive", "fixed", "auto")
MAX_WINDOW = 64  # the most tokens one step may draft

# WindowSpec field -> its name in manifests, config, the draft API and status JSON.
FIELDS = {"policy": "window_policy", "initial": "initial_window", "min": "min_window",
          "max": "max_window"}


class WindowError(LayerlineError):
    """A draft window policy is unknown, or its sizes are out of range or out of order."""


@dataclass(frozen=True)
class WindowSpec:
    policy: str = "adaptive"  # "fixed" | "adaptive" | "auto"
    initial: int = 8  # tokens drafted by the first step (every step, when fixed)
    min: int = 2  # the adaptive window never shrinks below this
    max: int = 16  # nor grows above this

    @classmethod
    def fixed(cls, window: int) -> WindowSpec:
        """Always draft `window` tokens."""
        return cls("fixed", window, window, window)

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> WindowSpec:
        """A spec from settings named as in `FIELDS`; those missing take the defaults."""
        defaults = cls()
        return cls(**{field: values.get(name, getattr(defaults, field)) for field, name in FIELDS.items()})

    def to_json(self) -> dict[str, Any]:
        """The four settings, named as in `FIELDS`."""
        return {name: getattr(self, field) for field, name in FIELDS.items()}

    def validate(self) -> WindowSpec:
        """Return self, or raise WindowError saying what is wrong and what is allowed."""
        check_policy(self.policy)
        sizes = [self.initial] if self.policy == "fixed" else [self.min, self.initial, self.max]
        for size in sizes:
            check_window_size(size)
        if self.policy != "fixed" and not self.min <= self.initial <= self.max:
            raise WindowError(
                f"{self.policy} draft windows out of order: min_window {self.min}, initial_window "
                f"{self.initial}, max_window {self.max}",
                hint="choose min_window <= initial_window <= max_window")
        return self

    def describe(self) -> str:
        """`fixed window 4`, `adaptive window 8 in [2, 16]` or `auto window in [2, 16] (8 until measured)`."""
        if self.policy == "fixed":
            return f"fixed window {self.initial}"
        if self.policy == "auto":
            return f"auto window in [{self.min}, {self.max}] ({self.initial} until measured)"
        return f"adaptive window {self.initial} in [{self.min}, {self.max}]"


@dataclass(frozen=True)
class PartialWindowSpec:
    """Some of a `WindowSpec`'s settings; None means "not given here"."""

    policy: str | None = None
    initial: int | None = None
    min: int | None = None
    max: int | None = None

    @classmethod
    def of(cls, spec: WindowSpec) -> PartialWindowSpec:
        """All four settings of `spec`, given."""
        return cls(spec.policy, spec.initial, spec.min, spec.max)

    def given(self) -> dict[str, Any]:
        """The settings given here, by `WindowSpec` field."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def over(self, spec: WindowSpec) -> WindowSpec:
        """`spec` with the settings given here in place of its own."""
        return replace(spec, **self.given())

    def under(self, first: PartialWindowSpec) -> PartialWindowSpec:
        """`first`, with the settings it leaves open taken from here."""
        return replace(self, **first.given())


def check_policy(policy: Any) -> str:
    """A known window policy name, or WindowError."""
    if policy not in POLICIES:
        raise WindowError(f"window policy {policy!r} is unknown",
                          hint=f"use one of {', '.join(POLICIES)}")
    return policy


def check_window_size(size: Any) -> int:
    """A draft window size within 1..MAX_WINDOW, or WindowError."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_WINDOW:
        raise WindowError(f"draft window {size!r} is out of range",
                          hint=f"a draft window is 1 to {MAX_WINDOW} tokens")
    return size
