"""The speculation settings stage 0 serves with, whole (`SpeculationSettings`) and as one source
gives them (`PartialSpeculationSettings`: a config table or a package strategy).

Both carry the draft window as itself (a `WindowSpec`, a `PartialWindowSpec`); only `to_json`
and `given` name the settings as config does, for `layerline config show`, `/v1/status` and
the sources of each value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from layerline.packager.manifest import Strategy
from layerline.packager.window_spec import FIELDS, PartialWindowSpec, WindowSpec


@dataclass(frozen=True)
class SpeculationSettings:
    """How stage 0 speculates, each value with where it came from (`sources`, by config name)."""

    enabled: bool
    strategy: str | None = None  # a strategy of the package's generation block, by name
    type: str | None = None  # "draft-model" | "ngram"
    draft_model: str | None = None
    tokenizer_fingerprint: str | None = None
    window_spec: WindowSpec = field(default_factory=WindowSpec)
    overlap: bool = False  # draft the next window while the stages verify this one (measured: opt in)
    run_ahead: bool = False  # and send it into the pipeline before the verdict
    tree: str = "off"  # "off" | "auto" | "D,W[,N]": verify a drafted token tree per step (TreeSetting)
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where its value came from
    reason: str | None = None  # why speculation is off, when it is

    def to_json(self) -> dict[str, Any]:
        """The settings as config names them: the window's four settings side by side."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "window_spec"}
        return {**data, **self.window_spec.to_json()}

    def off(self, reason: str) -> SpeculationSettings:
        """The same settings, switched off for `reason` (e.g. the draft failed to load)."""
        return replace(self, enabled=False, reason=reason)


@dataclass(frozen=True)
class PartialSpeculationSettings:
    """The speculation settings one source gives; None means "not set here"."""

    enabled: bool | None = None
    strategy: str | None = None
    type: str | None = None
    draft_model: str | None = None
    tokenizer_fingerprint: str | None = None  # a package strategy's; config cannot set it
    window_spec: PartialWindowSpec = field(default_factory=PartialWindowSpec)
    overlap: bool | None = None
    run_ahead: bool | None = None
    tree: str | None = None

    @classmethod
    def of_strategy(cls, name: str, strategy: Strategy) -> PartialSpeculationSettings:
        """What the package's strategy `name` sets."""
        return cls(strategy=name, type=strategy.type, draft_model=strategy.draft_model,
                   tokenizer_fingerprint=strategy.tokenizer_fingerprint,
                   window_spec=PartialWindowSpec.of(strategy.window_spec))

    def given(self) -> list[str]:
        """The settings set here, by config name (the window's as in `FIELDS`)."""
        return [*self._scalars(), *(FIELDS[field] for field in self.window_spec.given())]

    def under(self, first: PartialSpeculationSettings) -> PartialSpeculationSettings:
        """`first`, with the settings it leaves open taken from here."""
        return replace(self, **first._scalars(), window_spec=self.window_spec.under(first.window_spec))

    def _scalars(self) -> dict[str, Any]:
        """The settings set here besides the window's."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "window_spec" and getattr(self, f.name) is not None}
