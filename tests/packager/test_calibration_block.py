"""A strategy's `calibration` block in model-package.json: parsed, refused when malformed, rewritten
in place without touching any file's checksum."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from layerline.errors import LayerlineError, ManifestError
from layerline.packager.manifest import (
    MANIFEST_NAME,
    Calibration,
    parse_manifest,
    read_manifest,
    write_json_atomic,
)
from layerline.packager.speculative import store_calibrations
from layerline.packager.verify import verify_package

CALIBRATION = Calibration(prompt_sets=("code", "prose", "chat"), prompts=9, positions=400, max_tokens=48,
                          acceptance_by_rank=(0.7, 0.1, 0.05, 0.02), acceptance_top_r=(0.7, 0.8, 0.85, 0.87),
                          acceptance_by_depth=(0.7, 0.75, 0.8, 0.8, 0.82, 0.85, 0.9, 0.9))


@pytest.fixture
def raw_with_strategies(tiny_llama_package: Path) -> dict:
    """The tiny package's manifest with a draft-model and an n-gram strategy, neither calibrated."""
    raw = json.loads((tiny_llama_package / MANIFEST_NAME).read_text())
    raw["generation"] = {"speculative_decoding": {"default": "draft", "strategies": {
        "draft": {"type": "draft-model", "draft_model": "./draft", "window_policy": "adaptive"},
        "lookup": {"type": "ngram"},
    }}}
    return raw


@pytest.fixture
def package_with_strategies(tiny_llama_package: Path, raw_with_strategies: dict, tmp_path: Path) -> Path:
    """A copy of the tiny package whose manifest declares two strategies."""
    root = tmp_path / "pkg"
    root.mkdir()
    for entry in read_manifest(tiny_llama_package).files:
        (root / entry.path).parent.mkdir(parents=True, exist_ok=True)
        (root / entry.path).write_bytes((tiny_llama_package / entry.path).read_bytes())
    write_json_atomic(root / MANIFEST_NAME, parse_manifest(raw_with_strategies).to_json())  # as built
    return root


def test_a_strategy_without_calibration_reads_as_none(raw_with_strategies):
    spec = parse_manifest(raw_with_strategies).speculative_decoding
    assert spec is not None
    assert all(s.calibration is None for s in spec.strategies.values())


def test_calibration_round_trips_through_the_manifest(raw_with_strategies):
    raw_with_strategies["generation"]["speculative_decoding"]["strategies"]["lookup"]["calibration"] = (
        CALIBRATION.to_json())
    manifest = parse_manifest(raw_with_strategies)
    assert manifest.speculative_decoding.strategies["lookup"].calibration == CALIBRATION
    assert manifest.speculative_decoding.strategies["draft"].calibration is None
    assert parse_manifest(manifest.to_json()) == manifest


@pytest.mark.parametrize(("change", "field", "problem"), [
    ({"acceptance_by_rank": [1.5, 0.1, 0.0, 0.0]}, "acceptance_by_rank", "probabilities in [0, 1]"),
    ({"acceptance_by_depth": []}, "acceptance_by_depth", "probabilities in [0, 1]"),
    ({"acceptance_by_depth": ["0.7"]}, "acceptance_by_depth", "probabilities in [0, 1]"),
    ({"acceptance_top_r": [0.7, 0.8]}, "acceptance_top_r", "as many ranks as acceptance_by_rank"),
    ({"positions": -3}, "positions", "must not be negative"),
    ({"prompts": True}, "prompts", "must be an integer"),
    ({"prompt_sets": [1, 2]}, "prompt_sets", "must list names"),
    ({"max_tokens": None}, "max_tokens", "must be an integer"),
])
def test_a_malformed_calibration_is_refused_naming_the_field(raw_with_strategies, change, field, problem):
    block = CALIBRATION.to_json() | change
    raw_with_strategies["generation"]["speculative_decoding"]["strategies"]["draft"]["calibration"] = block
    with pytest.raises(ManifestError, match=re.escape(problem)) as caught:
        parse_manifest(raw_with_strategies)
    assert f"generation.speculative_decoding.strategies.draft.calibration.{field}" in caught.value.message
    assert "pkg calibrate" in caught.value.hint


def test_a_calibration_missing_a_figure_is_refused(raw_with_strategies):
    block = CALIBRATION.to_json()
    del block["acceptance_by_depth"]
    raw_with_strategies["generation"]["speculative_decoding"]["strategies"]["draft"]["calibration"] = block
    with pytest.raises(ManifestError, match="calibration.acceptance_by_depth' is missing"):
        parse_manifest(raw_with_strategies)


def test_a_calibration_that_is_not_an_object_is_refused(raw_with_strategies):
    raw_with_strategies["generation"]["speculative_decoding"]["strategies"]["draft"]["calibration"] = "good"
    with pytest.raises(ManifestError, match="calibration' must be an object"):
        parse_manifest(raw_with_strategies)


def test_storing_a_calibration_changes_only_that_block_and_every_checksum_holds(package_with_strategies):
    before = json.loads((package_with_strategies / MANIFEST_NAME).read_text())
    store_calibrations(package_with_strategies, {"lookup": CALIBRATION})
    after = json.loads((package_with_strategies / MANIFEST_NAME).read_text())
    assert after["generation"]["speculative_decoding"]["strategies"]["lookup"]["calibration"] == (
        CALIBRATION.to_json())
    stripped = copy.deepcopy(after)
    del stripped["generation"]["speculative_decoding"]["strategies"]["lookup"]["calibration"]
    assert stripped == before
    assert verify_package(package_with_strategies, quiet=True) == len(after["files"])
    assert not [p for p in package_with_strategies.iterdir() if p.name.endswith(".tmp")]

    again = replace(CALIBRATION, prompts=3, prompt_sets=("code",))
    store_calibrations(package_with_strategies, {"lookup": again})
    strategies = read_manifest(package_with_strategies).speculative_decoding.strategies
    assert strategies["lookup"].calibration == again  # replaced, not merged
    assert strategies["draft"].calibration is None


def test_storing_a_calibration_for_an_unknown_strategy_is_refused(package_with_strategies):
    with pytest.raises(LayerlineError, match="declares no strategy 'nope' \\(it has: draft, lookup\\)"):
        store_calibrations(package_with_strategies, {"nope": CALIBRATION})
