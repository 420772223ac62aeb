"""Resolving speculation settings, and where each value came from.

Precedence: `--no-draft` (and `--tree`, for the tree setting) > `[models."<id>".speculative]`
> `[defaults.speculative]` > the package's `generation.speculative_decoding` default strategy
> off. The sources merge setting by setting (the window's four too): the first that sets a value gives it.
"""

from __future__ import annotations

from dataclasses import replace

from layerline.packager.manifest import SpeculativeDecoding
from layerline.packager.window_spec import FIELDS, WindowError, WindowSpec

from ...decode.draft_tree import check_tree_setting
from .config import SpeculationConfig
from .settings import PartialSpeculationSettings, SpeculationSettings

SOURCE_FLAG = "flag --no-draft"
SOURCE_TREE_FLAG = "flag --tree"
SOURCE_BUILTIN = "built-in default"


def resolve_speculation(
    model_id: str,
    package: SpeculativeDecoding | None,
    config: SpeculationConfig,
    *,
    no_draft: bool = False,
    tree: str | None = None,
) -> SpeculationSettings:
    """Apply the precedence rule; every value carries its source (`tree`: the --tree flag's)."""
    given, sources = PartialSpeculationSettings(tree=tree), {}
    if tree is not None:
        check_tree_setting(tree)
        sources["tree"] = SOURCE_TREE_FLAG
    for source, table in config.speculation_tables(model_id):
        given = _fill(given, table, source, sources)

    # The package's strategy fills what config leaves open: the one config names, else its default.
    strategy_name = given.strategy or (package.default if package else None)
    if package and strategy_name in package.strategies:
        strategy = PartialSpeculationSettings.of_strategy(strategy_name, package.strategies[strategy_name])
        given = _fill(given, strategy, f"package strategy {strategy_name!r}", sources)
    elif given.strategy is not None:
        known = sorted(package.strategies) if package else []
        return _off(given, sources, f"config names strategy {given.strategy!r}, which the "
                                    f"package does not declare (it has: {known or 'none'})")

    if given.draft_model and given.type is None:
        given, sources["type"] = replace(given, type="draft-model"), sources["draft_model"]
    if given.enabled is None:
        given = replace(given, enabled=given.type is not None)
        sources["enabled"] = sources.get("type", SOURCE_BUILTIN)
    for name in (*FIELDS.values(), "overlap", "run_ahead", "tree"):
        sources.setdefault(name, SOURCE_BUILTIN)

    if no_draft:
        sources["enabled"] = SOURCE_FLAG
        return _off(given, sources, "speculation disabled by --no-draft")
    if not given.enabled:
        reason = ("disabled by " + sources["enabled"]) if sources["enabled"] != SOURCE_BUILTIN else (
            "no draft configured: neither config nor the package declares one")
        return _off(given, sources, reason)
    if given.type in (None, "draft-model") and not given.draft_model:
        return _off(given, sources, "speculation is enabled but no draft_model is set")
    settings = _settings(given, sources, enabled=True)
    try:
        settings.window_spec.validate()
    except WindowError as exc:
        return settings.off(f"{exc.message} ({exc.hint})")
    return settings


def _fill(given: PartialSpeculationSettings, layer: PartialSpeculationSettings, source: str,
          sources: dict[str, str]) -> PartialSpeculationSettings:
    """`given`, with what it leaves open taken from `layer`; `sources` notes what came from `source`."""
    for name in layer.given():
        sources.setdefault(name, source)
    return layer.under(given)


def _settings(given: PartialSpeculationSettings, sources: dict[str, str], *, enabled: bool,
              reason: str | None = None) -> SpeculationSettings:
    return SpeculationSettings(
        enabled=enabled, strategy=given.strategy, type=given.type, draft_model=given.draft_model,
        tokenizer_fingerprint=given.tokenizer_fingerprint,
        window_spec=given.window_spec.over(WindowSpec()), overlap=bool(given.overlap),
        run_ahead=bool(given.run_ahead), tree=given.tree or "off", sources=sources, reason=reason)


def _off(given: PartialSpeculationSettings, sources: dict[str, str], reason: str) -> SpeculationSettings:
    return _settings(given, sources, enabled=False, reason=reason)
