"""Calibrating a package's drafters (`pkg build --calibrate`, `pkg calibrate`): real forward passes
of tiny random models, a draft that is the target itself, another model, and n-gram lookup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from layerline.errors import LayerlineError
from layerline.packager.build import BuildOptions, build_package
from layerline.packager.manifest import read_manifest
from layerline.packager.speculative import DraftSpec
from layerline.packager.verify import verify_package
from layerline.runtime.bench.tiny_model import random_llama_weights, write_hf_folder
from layerline.runtime.decode.calibration import (
    MAX_DEPTH,
    MAX_RANK,
    DraftMeasure,
    TargetRun,
    calibrate_package,
    chains_of,
    measure_ngram,
    ranks_of,
    summarize,
)
from layerline.runtime.decode.calibration_prompts import CALIBRATION_PROMPTS, DEFAULT_MAX_TOKENS

from helpers import TINY_LLAMA_CONFIG

LAYERLINE = [sys.executable, "-m", "layerline"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAYERLINE, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def other_draft(tiny_llama: dict, smollm2_tokenizer_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller random llama (2 layers, other weights) with the target's tokenizer."""
    root = tmp_path_factory.mktemp("other-draft")
    config = {**TINY_LLAMA_CONFIG, "num_hidden_layers": 2}
    folder = write_hf_folder(root / "hf", config, random_llama_weights(config, seed=7), smollm2_tokenizer_dir)
    build_package(str(folder), root / "package", BuildOptions(quantize="f32", fidelity=False, quiet=True))
    return root / "package"


@pytest.fixture(scope="module")
def calibrated(tiny_llama: dict, tiny_llama_package: Path, other_draft: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama built with three strategies and `--calibrate`, through the CLI."""
    out = tmp_path_factory.mktemp("calibrated") / "pkg"
    done = run_cli("pkg", "build", str(tiny_llama["folder"]), "-o", str(out), "--quantize", "f32",
                   "--no-fidelity", "--quiet",
                   "--draft-model", str(tiny_llama_package), "--strategy-name", "self",
                   "--draft-model", str(other_draft), "--strategy-name", "other",
                   "--draft-model", "ngram", "--strategy-name", "lookup", "--calibrate")
    assert done.returncode == 0, done.stderr
    assert "calibrated self: top-1 100.0%" in done.stdout
    return out


def test_build_with_calibrate_stores_each_strategys_acceptance(calibrated):
    strategies = read_manifest(calibrated).speculative_decoding.strategies
    prompts = sum(len(texts) for texts in CALIBRATION_PROMPTS.values())
    for name in ("self", "other", "lookup"):
        calibration = strategies[name].calibration
        assert calibration is not None, name
        assert calibration.prompt_sets == ("code", "prose", "chat")  # the tiny llama has a chat template
        assert calibration.prompts == prompts
        assert 0 < calibration.positions <= prompts * DEFAULT_MAX_TOKENS
        assert calibration.max_tokens == DEFAULT_MAX_TOKENS
        assert len(calibration.acceptance_by_rank) == len(calibration.acceptance_top_r) == MAX_RANK
        assert len(calibration.acceptance_by_depth) == MAX_DEPTH
        figures = [*calibration.acceptance_by_rank, *calibration.acceptance_top_r,
                   *calibration.acceptance_by_depth]
        assert all(0.0 <= f <= 1.0 for f in figures), (name, figures)
        assert list(calibration.acceptance_top_r) == sorted(calibration.acceptance_top_r)
    # Every strategy was measured on the same continuations.
    assert len({strategies[n].calibration.positions for n in ("self", "other", "lookup")}) == 1
    itself = strategies["self"].calibration
    assert itself.acceptance_by_rank == (1.0, 0.0, 0.0, 0.0)
    assert itself.acceptance_top_r == (1.0,) * MAX_RANK
    assert itself.acceptance_by_depth == (1.0,) * MAX_DEPTH
    assert strategies["other"].calibration.acceptance_by_rank[0] < 1.0
    assert strategies["lookup"].calibration.acceptance_by_rank[1:] == (0.0,) * (MAX_RANK - 1)


def test_inspect_shows_the_calibration_and_verify_still_passes(calibrated):
    done = run_cli("pkg", "inspect", str(calibrated))
    assert done.returncode == 0, done.stderr
    assert "calibration" in done.stdout and "top-1 100.0%" in done.stdout
    done = run_cli("pkg", "inspect", str(calibrated), "--json")
    assert done.returncode == 0, done.stderr
    block = json.loads(done.stdout)["speculative_decoding"]["strategies"]["self"]["calibration"]
    assert block == read_manifest(calibrated).speculative_decoding.strategies["self"].calibration.to_json()
    assert verify_package(calibrated, quiet=True) > 0


def test_calibrating_again_replaces_only_the_named_strategys_block(calibrated, tmp_path):
    before = read_manifest(calibrated).speculative_decoding.strategies
    results = calibrate_package(calibrated, strategies=["other"], max_tokens=3, cache_dir=tmp_path,
                                quiet=True)
    after = read_manifest(calibrated).speculative_decoding.strategies
    assert after["other"].calibration == results["other"]
    assert results["other"].max_tokens == 3
    assert results["other"].positions <= 3 * results["other"].prompts
    assert after["self"].calibration == before["self"].calibration
    assert after["lookup"].calibration == before["lookup"].calibration
    verify_package(calibrated, quiet=True)


@pytest.mark.parametrize("reference", ["org/remote-draft:Q4_K_M", "org/remote-package"])
def test_a_draft_that_is_not_on_this_machine_is_refused_naming_the_fix(tiny_llama, tmp_path, reference):
    build_package(str(tiny_llama["folder"]), tmp_path / "pkg",
                  BuildOptions(quantize="f32", fidelity=False, quiet=True,
                               drafts=[DraftSpec(reference=reference, name="remote")]))
    with pytest.raises(LayerlineError, match="not on this machine") as caught:
        calibrate_package(tmp_path / "pkg", cache_dir=tmp_path / "cache", quiet=True)
    assert f"layerline pkg build {reference} -o DIR" in caught.value.hint
    assert read_manifest(tmp_path / "pkg").speculative_decoding.strategies["remote"].calibration is None


def test_a_package_without_strategies_is_refused(tiny_llama_package, tmp_path):
    done = run_cli("pkg", "calibrate", str(tiny_llama_package), "--cache-dir", str(tmp_path))
    assert done.returncode != 0
    assert "declares no speculative-decoding strategy" in " ".join(done.stderr.split())


# ---------------------------------------------------------------- the figures


def test_rank_counts_higher_logits_and_ties_before_the_token():
    logits = mx.array([[0.1, 0.9, 0.5, 0.9, 0.0, 0.2],
                       [0.1, 0.9, 0.5, 0.9, 0.0, 0.2],
                       [0.1, 0.9, 0.5, 0.9, 0.0, 0.2],
                       [0.1, 0.9, 0.5, 0.9, 0.0, 0.2]])
    # id 1 is the argmax (tied with 3, lower id first); 3 comes second; 4 is last (rank 6 > MAX_RANK);
    # id 9 is past the vocabulary.
    assert ranks_of(logits, [1, 3, 4, 9]) == [1, 2, 0, 0]


def test_chains_run_on_over_consecutive_hits_up_to_the_deepest_depth():
    assert chains_of([True, True, False, True, False]) == [2, 1, 0, 1, 0]
    assert chains_of([True] * (MAX_DEPTH + 3)) == [MAX_DEPTH] * 4 + list(range(MAX_DEPTH - 1, 0, -1))


def test_acceptance_by_depth_is_conditional_on_the_depth_before():
    hits = [True, True, False, True, True, True, False, True]
    measure = DraftMeasure(ranks=[1 if h else 2 for h in hits], chains=chains_of(hits))
    run = TargetRun("code", [0], [0] * len(hits), [0] * len(hits))
    calibration = summarize([run], [measure], max_tokens=len(hits))
    assert calibration.positions == 8
    assert calibration.acceptance_by_rank == (0.75, 0.25, 0.0, 0.0)
    assert calibration.acceptance_top_r == (0.75, 1.0, 1.0, 1.0)
    # Chains of hits from each start: 2 1 0 3 2 1 0 1. Depth 2 (starts 0..6): 3 of the 5 that
    # reached depth 1; depth 3 (starts 0..5): 1 of 3; depth 4 (starts 0..4): 0 of 1.
    assert calibration.acceptance_by_depth[:4] == (0.75, 0.6, round(1 / 3, 4), 0.0)
    assert calibration.acceptance_by_depth[4:] == (0.0,) * (MAX_DEPTH - 4)  # never reached: nothing


def test_ngram_lookup_is_measured_by_its_own_proposals():
    pattern = [5, 6, 7, 8]
    run = TargetRun("code", pattern * 2, pattern * 2, pattern * 2)
    measure = measure_ngram(run)
    assert measure.ranks == [1] * 8  # the repeating pattern is always found
    assert measure.chains == [min(MAX_DEPTH, 8 - i) for i in range(8)]
    novel = TargetRun("prose", [1, 2, 3], [4, 5, 6], [4, 5, 6])
    assert measure_ngram(novel).ranks == [0, 0, 0]
