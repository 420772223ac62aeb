"""A `[defaults.speculative]` or `[models."<id>".speculative]` table of the TOML config, parsed
and validated in one place (the whole config file: `serve/config.py`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

from layerline.errors import LayerlineError
from layerline.packager.window_spec import FIELDS, WindowError, check_policy, check_window_size


class ConfigError(LayerlineError):
    """The TOML config is unreadable or holds an unknown or ill-typed setting."""


@dataclass(frozen=True)
class SpeculativeSettings:
    """One `[...speculative]` table; None means "not set here"."""

    enabled: bool | None = None
    strategy: str | None = None  # a strategy of the package's generation block, by name
    type: str | None = None  # "draft-model" | "ngram"
    draft_model: str | None = None
    window_policy: str | None = None  # "adaptive" | "fixed" | "auto"; the sizes are draft windows
    overlap: bool | None = None  # draft the next window while the stages verify (default off)
    run_ahead: bool | None = None  # send that window before the verdict (default off)
    initial_window: int | None = None
    min_window: int | None = None
    max_window: int | None = None

    def set_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


class SpeculativeConfig(Protocol):
    """Where speculation settings are configured (layerline's TOML config)."""

    def speculative_tables(self, model_id: str) -> list[tuple[str, SpeculativeSettings]]:
        """The tables that apply to `model_id`, most specific first, each with where it is written."""
        ...


_TYPES = {"enabled": bool, "strategy": str, "type": str, "draft_model": str, "overlap": bool,
          "run_ahead": bool,
          **{name: str if field == "policy" else int for field, name in FIELDS.items()}}
_CHOICES = {"type": ("draft-model", "ngram")}
_RENAMED = {"window": "window_policy"}  # keys of earlier versions, and what they are now


def parse_speculative_table(raw: Any, where: str) -> SpeculativeSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    values = {}
    for key, value in raw.items():
        if key in _RENAMED:
            raise ConfigError(f"{where}: setting {key!r} is now called {_RENAMED[key]!r}",
                              hint=f"write {_RENAMED[key]} = {value!r}")
        if key not in _TYPES:
            raise ConfigError(f"{where}: unknown setting {key!r}; known: {', '.join(_TYPES)}")
        kind = _TYPES[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key} must be {kind.__name__}, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{where}.{key} must be one of {_CHOICES[key]}, got {value!r}")
        try:
            if key == FIELDS["policy"]:
                check_policy(value)
            elif key in FIELDS.values():
                check_window_size(value)
        except WindowError as exc:
            raise ConfigError(f"{where}.{key}: {exc.message}", hint=exc.hint) from exc
        values[key] = value
    return SpeculativeSettings(**values)


