"""Resolving speculation settings, and where each value came from.

Precedence: `--no-draft` > `[models."<id>".speculative]` > `[defaults.speculative]`
> the package's `generation.speculative_decoding` default strategy > off.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from layerline.packager.manifest import SpeculativeDecoding, Strategy
from layerline.packager.window_spec import FIELDS, WindowError, WindowSpec

from .config import SpeculativeConfig, SpeculativeSettings

SOURCE_FLAG = "flag --no-draft"
SOURCE_BUILTIN = "built-in default"


@dataclass(frozen=True)
class ResolvedSpeculativeConfig:
    enabled: bool
    strategy: str | None = None
    type: str | None = None
    draft_model: str | None = None
    tokenizer_fingerprint: str | None = None
    window_spec: WindowSpec = field(default_factory=WindowSpec)
    overlap: bool = False  # draft the next window while the stages verify this one (measured: opt in)
    run_ahead: bool = False  # and send it into the pipeline before the verdict
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where its value came from
    reason: str | None = None  # why speculation is off, when it is

    def to_json(self) -> dict[str, Any]:
        """The settings as config names them: the window's four settings side by side."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "window_spec"}
        return {**data, **self.window_spec.to_json()}

    def off(self, reason: str) -> ResolvedSpeculativeConfig:
        """The same settings, switched off for `reason` (e.g. the draft failed to load)."""
        return replace(self, enabled=False, reason=reason)


def _strategy_values(name: str, strategy: Strategy) -> dict[str, Any]:
    return {
        "strategy": name,
        "type": strategy.type,
        "draft_model": strategy.draft_model,
        "tokenizer_fingerprint": strategy.tokenizer_fingerprint,
        **strategy.window_spec.to_json(),
    }


def resolve_speculative(
    model_id: str,
    package: SpeculativeDecoding | None,
    config: SpeculativeConfig,
    *,
    no_draft: bool = False,
) -> ResolvedSpeculativeConfig:
    """Apply the precedence rule; every value carries its source."""
    layers: list[tuple[str, SpeculativeSettings]] = config.speculative_tables(model_id)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, settings in layers:
        for key, value in settings.set_fields().items():
            if key not in values:
                values[key], sources[key] = value, source

    # The package's strategy fills what config leaves open: the one config names, else its default.
    strategy_name = values.get("strategy") or (package.default if package else None)
    if package and strategy_name in package.strategies:
        source = f"package strategy {strategy_name!r}"
        for key, value in _strategy_values(strategy_name, package.strategies[strategy_name]).items():
            if key not in values and value is not None:
                values[key], sources[key] = value, source
    elif "strategy" in values:
        known = sorted(package.strategies) if package else []
        return _off(values, sources, f"config names strategy {values['strategy']!r}, which the "
                                     f"package does not declare (it has: {known or 'none'})")

    if values.get("draft_model") and "type" not in values:
        values["type"], sources["type"] = "draft-model", sources["draft_model"]
    if "enabled" not in values:
        values["enabled"] = "type" in values
        sources["enabled"] = sources.get("type", SOURCE_BUILTIN)
    for key in (*FIELDS.values(), "overlap", "run_ahead"):
        if key not in values:
            sources[key] = SOURCE_BUILTIN

    if no_draft:
        values["enabled"], sources["enabled"] = False, SOURCE_FLAG
        return _build(values, sources, "speculation disabled by --no-draft")
    if not values["enabled"]:
        reason = ("disabled by " + sources["enabled"]) if sources["enabled"] != SOURCE_BUILTIN else (
            "no draft configured: neither config nor the package declares one")
        return _build(values, sources, reason)
    if values.get("type", "draft-model") == "draft-model" and not values.get("draft_model"):
        return _off(values, sources, "speculation is enabled but no draft_model is set")
    values.setdefault("type", "draft-model")
    try:
        WindowSpec.from_json(values).validate()
    except WindowError as exc:
        return _off(values, sources, f"{exc.message} ({exc.hint})")
    return _build(values, sources, None)


def _build(values: dict[str, Any], sources: dict[str, str], reason: str | None) -> ResolvedSpeculativeConfig:
    known = {k: v for k, v in values.items() if k in ResolvedSpeculativeConfig.__dataclass_fields__}
    return ResolvedSpeculativeConfig(**known, window_spec=WindowSpec.from_json(values), sources=sources,
                                     reason=reason)


def _off(values: dict[str, Any], sources: dict[str, str], reason: str) -> ResolvedSpeculativeConfig:
    values = {**values, "enabled": False}
    return _build(values, sources, reason)
