"""Precedence of speculation settings: flag > model config > default config > package > off."""

from __future__ import annotations

import threading

import pytest

from layerline.packager.manifest import SpeculativeDecoding, Strategy
from layerline.packager.window_spec import WindowSpec
from layerline.runtime.decode.draft_tree import TreeShapeError
from layerline.runtime.decode.sampling import SamplingParams
from layerline.runtime.serve.config import ConfigError, load_config, parse_config
from layerline.runtime.stage0.speculation.plan import SpeculationPlanner
from layerline.runtime.stage0.speculation.resolve import SOURCE_BUILTIN, SOURCE_FLAG, resolve_speculation

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = SpeculativeDecoding(
    default="pkg-draft",
    strategies={
        "pkg-draft": Strategy(type="draft-model", draft_model="org/pkg-draft",
                              tokenizer_fingerprint="sha256:abc",
                              window_spec=WindowSpec("fixed", 6, 3, 12)),
        "lookup": Strategy(type="ngram", window_spec=WindowSpec("adaptive", 4, 2, 8)),
    },
)
MODEL_TABLE = f'[models."{MODEL}".speculative]'
FULL_CONFIG = f"""
[defaults.speculative]
enabled = true
window_policy = "adaptive"
initial_window = 5
max_window = 20

{MODEL_TABLE}
draft_model = "./packages/model-draft"
initial_window = 4
"""


def config(text: str, tmp_path) -> object:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("case", ["flag", "model", "defaults", "package", "none"])
def test_precedence_matrix(case, tmp_path):
    cfg = config(FULL_CONFIG if case in ("flag", "model") else
                 FULL_CONFIG.split(MODEL_TABLE)[0] + '\ndraft_model = "./packages/default-draft"\n'
                 if case == "defaults" else "", tmp_path)
    package = PACKAGE if case != "none" else None
    resolved = resolve_speculation(MODEL, package, cfg, no_draft=case == "flag")
    model_src = f'{cfg.path} [models."{MODEL}".speculative]'
    default_src = f"{cfg.path} [defaults.speculative]"
    package_src = "package strategy 'pkg-draft'"

    if case == "flag":
        assert not resolved.enabled
        assert resolved.sources["enabled"] == SOURCE_FLAG
        assert resolved.reason == "speculation disabled by --no-draft"
        assert resolved.draft_model == "./packages/model-draft"  # still shown, just off
    elif case == "model":
        assert resolved.enabled and resolved.reason is None
        assert (resolved.draft_model, resolved.sources["draft_model"]) == ("./packages/model-draft",
                                                                           model_src)
        assert (resolved.window_spec.initial, resolved.sources["initial_window"]) == (4, model_src)
        assert (resolved.window_spec.max, resolved.sources["max_window"]) == (20, default_src)
        assert (resolved.window_spec.policy, resolved.sources["window_policy"]) == ("adaptive", default_src)
        assert (resolved.window_spec.min, resolved.sources["min_window"]) == (3, package_src)
        assert resolved.sources["enabled"] == default_src
    elif case == "defaults":
        assert resolved.enabled
        assert (resolved.draft_model, resolved.sources["draft_model"]) == (
            "./packages/default-draft", default_src)
        assert (resolved.window_spec.initial, resolved.sources["initial_window"]) == (5, default_src)
        assert resolved.strategy == "pkg-draft"  # the package default fills the rest
    elif case == "package":
        assert resolved.enabled
        assert (resolved.draft_model, resolved.sources["draft_model"]) == ("org/pkg-draft", package_src)
        assert resolved.window_spec == WindowSpec("fixed", 6, 3, 12)
        assert resolved.tokenizer_fingerprint == "sha256:abc"
        assert resolved.sources["enabled"] == package_src
    else:
        assert not resolved.enabled
        assert resolved.sources["enabled"] == SOURCE_BUILTIN
        assert "no draft configured" in resolved.reason


def test_config_can_pick_another_package_strategy(tmp_path):
    cfg = config('[defaults.speculative]\nstrategy = "lookup"\n', tmp_path)
    resolved = resolve_speculation(MODEL, PACKAGE, cfg)
    assert resolved.enabled and resolved.type == "ngram" and resolved.draft_model is None
    assert resolved.window_spec.initial == 4


def test_config_can_switch_off_a_package_default(tmp_path):
    cfg = config(f"{MODEL_TABLE}\nenabled = false\n", tmp_path)
    resolved = resolve_speculation(MODEL, PACKAGE, cfg)
    assert not resolved.enabled and "disabled by" in resolved.reason


def test_unknown_strategy_name_turns_speculation_off_with_a_reason(tmp_path):
    cfg = config('[defaults.speculative]\nstrategy = "nope"\n', tmp_path)
    resolved = resolve_speculation(MODEL, PACKAGE, cfg)
    assert not resolved.enabled and "'nope'" in resolved.reason and "lookup" in resolved.reason


def test_enabled_without_a_draft_is_off_with_a_reason(tmp_path):
    resolved = resolve_speculation(MODEL, None, config("[defaults.speculative]\nenabled = true\n",
                                                       tmp_path))
    assert not resolved.enabled and "no draft_model" in resolved.reason


@pytest.mark.parametrize("text, message", [
    ("[defaults.speculative]\nwindow_policy = 'wide'\n", "window policy 'wide' is unknown"),
    ("[defaults.speculative]\nwindow = 'fixed'\n", "'window' is now called 'window_policy'"),
    ("[defaults.speculative]\nmax_window = 100\n", "draft window 100 is out of range"),
    ("[defaults.speculative]\ninitial_window = 'eight'\n", "must be int"),
    ("[defaults.speculative]\ndraft = 'x'\n", "unknown setting 'draft'"),
    ("[stage]\nport = 1\n", "unknown setting"),
    ("[defaults.speculative\n", "not valid TOML"),
    ("[defaults.speculative]\ntree = 'wide'\n", "tree 'wide'.*off, auto or DEPTH,WIDTH"),
    ("[defaults.speculative]\ntree = '0,2'\n", "at least 1"),
])
def test_bad_config_is_refused_naming_the_setting(text, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        config(text, tmp_path)


def test_missing_explicit_config_is_an_error_but_missing_default_is_not(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config().path is None
    assert parse_config({}).stage.listen is None  # each kind of stage has its own default


def test_the_tree_setting_follows_the_precedence_and_the_flag_comes_first(tmp_path):
    cfg = config(f'[defaults.speculative]\ntree = "auto"\n{MODEL_TABLE}\ntree = "4,2,6"\n', tmp_path)
    resolved = resolve_speculation(MODEL, PACKAGE, cfg)
    assert resolved.tree == "4,2,6" and resolved.sources["tree"] == f'{cfg.path} {MODEL_TABLE}'
    flagged = resolve_speculation(MODEL, PACKAGE, cfg, tree="off")
    assert flagged.tree == "off" and flagged.sources["tree"] == "flag --tree"
    plain = resolve_speculation(MODEL, PACKAGE, config("", tmp_path))
    assert plain.tree == "off" and plain.sources["tree"] == SOURCE_BUILTIN
    with pytest.raises(TreeShapeError, match="off, auto or DEPTH,WIDTH"):
        resolve_speculation(MODEL, PACKAGE, cfg, tree="deep")


def test_requests_draft_chains_where_the_stages_cannot_run_trees_and_status_says_why(tmp_path):
    settings = resolve_speculation(MODEL, None, config('[defaults.speculative]\ntype = "ngram"\n'
                                                       'tree = "auto"\noverlap = true\n', tmp_path))
    planner = SpeculationPlanner(settings, target_fingerprint="sha256:abc", cache_dir=tmp_path,
                                 weights="auto")
    lock = threading.Lock()
    planner.serve_target(supports_trees=True)
    plan = planner.plan(None, SamplingParams(), context_length=512, lock=lock)
    assert plan.tree is not None and plan.tree.kind == "auto" and not plan.overlap  # trees turn overlap off
    assert planner.to_json()["tree_state"]["active"]
    planner.serve_target(supports_trees=False)  # e.g. Gemma 2's soft-capped attention
    plan = planner.plan(None, SamplingParams(), context_length=512, lock=lock)
    assert plan.tree is None and plan.overlap and "cannot run a token tree" in plan.tree_reason
    state = planner.to_json()["tree_state"]
    assert not state["active"] and "cannot run a token tree" in state["chains_because"]
