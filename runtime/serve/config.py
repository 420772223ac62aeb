"""layerline's TOML config, parsed and validated in one place.

```toml
[defaults.speculative]
enabled = true
window_policy = "adaptive"
initial_window = 8

[models."HuggingFaceTB/SmolLM2-135M-Instruct".speculative]
draft_model = "./packages/smollm2-draft"

[stage]
listen = "127.0.0.1:7700"

[admin]                                  # what PUT /v1/draft may load, and who may ask
draft_roots = ["./packages"]
hub_drafts = ["Qwen/*"]
allowed_hosts = ["gpu-box.lan"]
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from layerline.errors import LayerlineError
from layerline.packager.window_spec import FIELDS, WindowError, check_policy, check_window_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("~/.config/layerline/config.toml")


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


@dataclass(frozen=True)
class StageSettings:
    listen: str | None = None  # a peer's default is 127.0.0.1:7700, stage 0's a free loopback port
    http: str = "127.0.0.1:8000"
    cache_dir: str | None = None


@dataclass(frozen=True)
class AdminSettings:
    """What the admin API may do: `PUT /v1/draft` loads only local drafts under `draft_roots`
    (default: the folder holding the served package) or Hub repos matching `hub_drafts` (shell
    patterns, default none); requests must name one of `allowed_hosts` (besides loopback) in Host."""

    draft_roots: tuple[str, ...] = ()
    hub_drafts: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerlineConfig:
    path: Path | None = None
    defaults: SpeculativeSettings = field(default_factory=SpeculativeSettings)
    models: dict[str, SpeculativeSettings] = field(default_factory=dict)
    stage: StageSettings = field(default_factory=StageSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)


_TYPES = {"enabled": bool, "strategy": str, "type": str, "draft_model": str, "overlap": bool,
          "run_ahead": bool,
          **{name: str if field == "policy" else int for field, name in FIELDS.items()}}
_CHOICES = {"type": ("draft-model", "ngram")}
_RENAMED = {"window": "window_policy"}  # keys of earlier versions, and what they are now


def _speculative(raw: Any, where: str) -> SpeculativeSettings:
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


def parse_config(raw: dict[str, Any], path: Path | None = None) -> LayerlineConfig:
    """Validate a parsed TOML document."""
    where = str(path) if path else "config"
    unknown = set(raw) - {"defaults", "models", "stage", "admin"}
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {sorted(unknown)}; known: defaults, models, stage, "
                          "admin")
    defaults = _speculative(raw.get("defaults", {}).get("speculative", {}),
                            f"{where} [defaults.speculative]")
    models = {}
    for model_id, table in raw.get("models", {}).items():
        models[model_id] = _speculative(table.get("speculative", {}),
                                        f'{where} [models."{model_id}".speculative]')
    stage_raw = raw.get("stage", {})
    stage_unknown = set(stage_raw) - {"listen", "http", "cache_dir"}
    if stage_unknown:
        raise ConfigError(f"{where} [stage]: unknown setting(s) {sorted(stage_unknown)}")
    stage = StageSettings(**stage_raw)
    return LayerlineConfig(path=path, defaults=defaults, models=models, stage=stage,
                           admin=_admin(raw.get("admin", {}), f"{where} [admin]"))


def _admin(raw: Any, where: str) -> AdminSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name for f in fields(AdminSettings)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}.{key} must be a list of non-empty strings, got {value!r}")
        values[key] = tuple(value)
    return AdminSettings(**values)


def load_config(path: Path | str | None = None) -> LayerlineConfig:
    """Read the config at `path`, or the default path if it exists, or return an empty config."""
    explicit = path is not None
    target = Path(path if explicit else DEFAULT_CONFIG_PATH).expanduser()
    if not target.is_file():
        if explicit:
            raise ConfigError(f"config file {target} does not exist",
                              hint="check the --config path")
        return LayerlineConfig()
    try:
        raw = tomllib.loads(target.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{target} is not valid TOML: {exc}") from exc
    return parse_config(raw, target)
