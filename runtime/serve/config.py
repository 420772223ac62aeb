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

from ..stage0.speculation.config import ConfigError, parse_speculation_table
from ..stage0.speculation.settings import PartialSpeculationSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("~/.config/layerline/config.toml")


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
    defaults: PartialSpeculationSettings = field(default_factory=PartialSpeculationSettings)
    models: dict[str, PartialSpeculationSettings] = field(default_factory=dict)
    stage: StageSettings = field(default_factory=StageSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)

    def speculation_tables(self, model_id: str) -> list[tuple[str, PartialSpeculationSettings]]:
        """The `[...speculative]` tables that apply to `model_id`, most specific first, each with
        where it is written."""
        name = str(self.path) if self.path else "config"
        tables = []
        if model_id in self.models:
            tables.append((f'{name} [models."{model_id}".speculative]', self.models[model_id]))
        tables.append((f"{name} [defaults.speculative]", self.defaults))
        return tables


def parse_config(raw: dict[str, Any], path: Path | None = None) -> LayerlineConfig:
    """Validate a parsed TOML document."""
    where = str(path) if path else "config"
    unknown = set(raw) - {"defaults", "models", "stage", "admin"}
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {sorted(unknown)}; known: defaults, models, stage, "
                          "admin")
    defaults = parse_speculation_table(raw.get("defaults", {}).get("speculative", {}),
                                       f"{where} [defaults.speculative]")
    models = {}
    for model_id, table in raw.get("models", {}).items():
        models[model_id] = parse_speculation_table(table.get("speculative", {}),
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
