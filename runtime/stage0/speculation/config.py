"""A `[defaults.speculative]` or `[models."<id>".speculative]` table of the TOML config, parsed
and validated in one place into `PartialSpeculationSettings` (the whole config file:
`serve/config.py`)."""

from __future__ import annotations

from typing import Any, Protocol

from layerline.errors import LayerlineError
from layerline.packager.window_spec import (
    FIELDS,
    PartialWindowSpec,
    WindowError,
    check_policy,
    check_window_size,
)

from ...decode.draft_tree import TreeShapeError, check_tree_setting
from .settings import PartialSpeculationSettings


class ConfigError(LayerlineError):
    """The TOML config is unreadable or holds an unknown or ill-typed setting."""


class SpeculationConfig(Protocol):
    """Where speculation settings are configured (layerline's TOML config)."""

    def speculation_tables(self, model_id: str) -> list[tuple[str, PartialSpeculationSettings]]:
        """The tables that apply to `model_id`, most specific first, each with where it is written."""
        ...


_SETTINGS = {"enabled": bool, "strategy": str, "type": str, "draft_model": str, "overlap": bool,
             "run_ahead": bool, "tree": str}
_WINDOW = {name: field for field, name in FIELDS.items()}  # config name -> WindowSpec field
_TYPES = {**_SETTINGS, **{name: str if field == "policy" else int for name, field in _WINDOW.items()}}
_CHOICES = {"type": ("draft-model", "ngram")}
_RENAMED = {"window": "window_policy"}  # keys of earlier versions, and what they are now


def parse_speculation_table(raw: Any, where: str) -> PartialSpeculationSettings:
    """One `[...speculative]` table, every value checked; `where` names it in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    settings, window = {}, {}
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
        if key == "tree":
            value = _tree_setting(value, where)
        if key in _WINDOW:
            window[_WINDOW[key]] = _window_setting(key, value, where)
        else:
            settings[key] = value
    return PartialSpeculationSettings(**settings, window_spec=PartialWindowSpec(**window))


def _tree_setting(value: str, where: str) -> str:
    """A tree setting ("off", "auto", "D,W[,N]"), checked as `--tree` is."""
    try:
        return check_tree_setting(value)
    except TreeShapeError as exc:
        raise ConfigError(f"{where}.tree: {exc.message}", hint=exc.hint) from exc


def _window_setting(key: str, value: Any, where: str) -> Any:
    """A window policy or size, checked as a manifest's or `PUT /v1/draft`'s are."""
    try:
        return check_policy(value) if key == FIELDS["policy"] else check_window_size(value)
    except WindowError as exc:
        raise ConfigError(f"{where}.{key}: {exc.message}", hint=exc.hint) from exc
