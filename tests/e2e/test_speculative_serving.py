"""Speculation on a real stage 0: the draft verified through 2 and 3 stage processes gives the
same greedy text as plain decoding, with every window; stats in `usage` and `/metrics`; an
n-gram strategy; a draft that cannot be had leaves the server serving plainly and saying why."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil

import httpx
import pytest

from helpers import (
    MAX_TOKENS,
    PROMPTS,
    WINDOWS,
    Stage0Process,
    complete,
    greedy_reference,
    start_stage0,
    wait_for_draft,
)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TWO_STAGES = pytest.mark.parametrize("drafted_pipeline", [1], ids=["2-stages"], indirect=True)


@pytest.fixture(scope="module")
def drafted_pipeline(request, smollm2_package, smollm2_exact_package, tmp_path_factory):
    """SmolLM2 split over stage 0 and `request.param` more stages, its exact (Q4_1) package as the draft."""
    cache = tmp_path_factory.mktemp(f"speculation-{request.param}")
    config = f'[defaults.speculative]\ndraft_model = "{smollm2_exact_package}"\nwindow_policy = "adaptive"\n'
    stage0, stages = start_stage0(smollm2_package, request.param, cache, config)
    wait_for_draft(stage0, "ready")
    yield stage0
    stage0.stop()
    for stage in stages:
        stage.stop()


@pytest.mark.slow
@pytest.mark.parametrize("drafted_pipeline", [1, 2], ids=["2-stages", "3-stages"], indirect=True)
def test_greedy_text_is_identical_with_and_without_the_draft_for_every_window(drafted_pipeline):
    status = drafted_pipeline.status()
    assert status["speculative"]["active"] and status["speculative"]["enabled"]
    for prompt in PROMPTS:
        plain = complete(drafted_pipeline, prompt, {"enabled": False})
        assert plain["usage"]["speculative"]["enabled"] is False
        assert plain["usage"]["speculative"]["reason"] == "disabled by the request"
        for window in WINDOWS:
            drafted = complete(drafted_pipeline, prompt, window)
            usage = drafted["usage"]["speculative"]
            assert drafted["choices"][0]["text"] == plain["choices"][0]["text"], (prompt, window)
            assert drafted["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
            assert usage["enabled"] and usage["drafted"] > 0, usage
            assert usage["window_policy"] == ("fixed" if window else "adaptive")
            # The draft is the target in another weight format: it is nearly always right.
            assert usage["accepted"] > 0
            assert usage["target_passes"] < drafted["usage"]["completion_tokens"] or window == {"window": 1}


@pytest.mark.slow
@TWO_STAGES
def test_concurrent_speculating_requests_get_their_own_answers(drafted_pipeline):
    prompts = [*PROMPTS, "Once upon a time", "import numpy as"]
    alone = [complete(drafted_pipeline, p, {"window": 4})["choices"][0]["text"] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: complete(drafted_pipeline, p, {"window": 4}), prompts))
    assert [r["choices"][0]["text"] for r in replies] == alone
    assert all(r["usage"]["speculative"]["enabled"] for r in replies)


@TWO_STAGES
def test_usage_and_metrics_count_drafts_acceptances_and_passes(drafted_pipeline):
    before = _speculation_metrics(drafted_pipeline)
    replies = [complete(drafted_pipeline, prompt, {"window": 4}) for prompt in PROMPTS]
    after = _speculation_metrics(drafted_pipeline)
    usages = [r["usage"]["speculative"] for r in replies]
    for usage, reply in zip(usages, replies, strict=True):
        assert usage["accept_rate"] == round(usage["accepted"] / usage["drafted"], 4)
        assert usage["tokens"] == reply["usage"]["completion_tokens"]
        assert usage["tokens_per_pass"] == round(usage["tokens"] / usage["target_passes"], 4)
        assert usage["draft_seconds"] > 0 and usage["verify_seconds"] > 0
    for key, name in (("drafted", "drafted_tokens_total"), ("accepted", "accepted_tokens_total"),
                      ("target_passes", "target_passes_total"), ("tokens", "tokens_total")):
        assert after[name] - before[name] == sum(u[key] for u in usages), name
    speculating = 'requests_total{mode="speculative"}'
    assert after[speculating] - before.get(speculating, 0) == 2
    assert after["accept_rate"] == pytest.approx(after["accepted_tokens_total"]
                                                 / after["drafted_tokens_total"])
    assert after["tokens_per_pass"] == pytest.approx(after["tokens_total"] / after["target_passes_total"])
    assert after["draft_seconds_total"] > before["draft_seconds_total"]
    assert after["verify_seconds_total"] > before["verify_seconds_total"]


def _speculation_metrics(stage0: Stage0Process) -> dict[str, float]:
    """`layerline_speculative_*` samples by name (labels included), without the prefix."""
    text = httpx.get(f"{stage0.url}/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^layerline_speculative_(\S+) (\S+)$", text, re.M)}


@pytest.mark.slow
@TWO_STAGES
def test_stop_strings_and_streaming_end_inside_accepted_drafts(drafted_pipeline):
    prompt = PROMPTS[1]
    plain = complete(drafted_pipeline, prompt, {"enabled": False}, max_tokens=40)["choices"][0]["text"]
    middle = len(plain) // 2
    stop = plain[middle:middle + 3]  # text in the middle of the answer
    expected = plain[:plain.index(stop)]
    drafted = complete(drafted_pipeline, prompt, {"window": 16}, max_tokens=40, stop=[stop])
    assert drafted["choices"][0]["text"] == expected
    assert drafted["choices"][0]["finish_reason"] == "stop"

    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "speculative": {"window": 8}}
    texts, usage = [], None
    with httpx.stream("POST", f"{drafted_pipeline.url}/v1/completions", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                texts += [c["text"] for c in chunk["choices"]]
                usage = chunk.get("usage") or usage
    assert "".join(texts) == plain
    assert usage is not None and usage["speculative"]["accepted"] > 0


# ---------------------------------------------------------------- n-gram and fallbacks


@pytest.mark.slow
def test_ngram_strategy_needs_no_model_and_keeps_the_greedy_text(smollm2_package, tmp_path):
    config = '[defaults.speculative]\ntype = "ngram"\nwindow_policy = "fixed"\ninitial_window = 4\n'
    stage0, stages = start_stage0(smollm2_package, 1, tmp_path, config)
    try:
        speculative = stage0.status()["speculative"]
        assert speculative["active"] and speculative["type"] == "ngram"
        assert speculative["draft"]["state"] == "none"
        for prompt in PROMPTS:
            drafted = complete(stage0, prompt, None, max_tokens=40)
            plain = complete(stage0, prompt, {"enabled": False}, max_tokens=40)
            assert drafted["choices"][0]["text"] == plain["choices"][0]["text"]
        # Code repeats itself: prompt lookup finds drafts the target accepts.
        assert drafted["usage"]["speculative"]["strategy"] == "ngram"
        assert drafted["usage"]["speculative"]["accepted"] > 0
    finally:
        stage0.stop()
        for stage in stages:
            stage.stop()


@pytest.fixture(scope="module")
def corrupt_draft(tiny_llama_package, tmp_path_factory):
    """The tiny llama package with one layer file cut short."""
    copy = tmp_path_factory.mktemp("corrupt-draft") / "package"
    shutil.copytree(tiny_llama_package, copy)
    layer = sorted(copy.glob("layers/*"))[0]
    layer.write_bytes(layer.read_bytes()[:100])
    return copy


@pytest.mark.parametrize("case", ["missing", pytest.param("mismatched", marks=pytest.mark.slow),
                                  pytest.param("corrupt", marks=pytest.mark.slow)])
def test_a_draft_that_cannot_be_had_leaves_the_server_serving_plainly(
        case, request, tiny_llama_package, tmp_path):
    draft = {"missing": lambda: tmp_path / "no-such-draft",
             "mismatched": lambda: request.getfixturevalue("foreign_tokenizer_draft"),
             "corrupt": lambda: request.getfixturevalue("corrupt_draft")}[case]()
    expected_reason = {"missing": "does not exist", "mismatched": "tokenizer",
                       "corrupt": "layers/"}[case]
    config = f'[defaults.speculative]\ndraft_model = "{draft}"\n'
    stage0, stages = start_stage0(tiny_llama_package, 0, tmp_path / "cache", config)
    try:
        speculative = wait_for_draft(stage0, "failed")
        assert not speculative["active"]
        assert expected_reason in speculative["draft"]["reason"], speculative
        assert expected_reason in speculative["inactive_reason"]
        reply = complete(stage0, PROMPTS[0], None)
        assert reply["usage"]["speculative"]["enabled"] is False
        assert "failed" in reply["usage"]["speculative"]["reason"]
        assert reply["choices"][0]["text"] == greedy_reference(tiny_llama_package, PROMPTS[0], MAX_TOKENS)
        asked = complete(stage0, PROMPTS[0], {"enabled": True})
        assert asked["usage"]["speculative"]["reason"].startswith("the request asked for speculation")
    finally:
        stage0.stop()
        for stage in stages:
            stage.stop()


def test_no_draft_flag_wins_over_config(smollm2_package, smollm2_f32_package, tmp_path):
    config = f'[defaults.speculative]\ndraft_model = "{smollm2_f32_package}"\n'
    stage0, _ = start_stage0(smollm2_package, 0, tmp_path, config, "--no-draft")
    try:
        speculative = stage0.status()["speculative"]
        assert not speculative["enabled"] and not speculative["active"]
        assert speculative["sources"]["enabled"] == "flag --no-draft"
        assert speculative["draft"]["state"] == "none"
        assert complete(stage0, PROMPTS[0], None)["usage"]["speculative"]["enabled"] is False
    finally:
        stage0.stop()
