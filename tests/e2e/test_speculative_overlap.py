"""Speculation that hides the pipeline, on real stage processes: stage 0 drafts the next window
while the stages verify and sends it before the verdict (run-ahead), with the auto window; the
greedy text stays the plain text over 2 and 3 stages, a request cancelled mid-step leaves
clean caches, and a stale window sent ahead is rolled back by the frame that corrects it."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from helpers import PROMPTS, activation_connection, batch_frame, complete, start_stage0, wait_for_draft


@pytest.fixture(scope="module")
def overlapped_pipeline(request, smollm2_package, smollm2_exact_package, tmp_path_factory):
    """SmolLM2 over stage 0 and `request.param` more stages, drafting with overlap, run-ahead and
    the auto window (its exact, Q4_1, package as the draft)."""
    cache = tmp_path_factory.mktemp(f"overlap-{request.param}")
    config = (f'[defaults.speculative]\ndraft_model = "{smollm2_exact_package}"\nwindow_policy = "auto"\n'
              "initial_window = 4\nmin_window = 1\nmax_window = 8\noverlap = true\nrun_ahead = true\n")
    stage0, stages = start_stage0(smollm2_package, request.param, cache, config)
    wait_for_draft(stage0, "ready")
    yield stage0, stages
    stage0.stop()
    for stage in stages:
        stage.stop()


TWO_STAGES = pytest.mark.parametrize("overlapped_pipeline", [1], ids=["2-stages"], indirect=True)


@pytest.mark.slow
@pytest.mark.parametrize("overlapped_pipeline", [1, 2],
                         ids=["2-stages", "3-stages"], indirect=True)
def test_greedy_text_is_identical_with_overlap_and_run_ahead(overlapped_pipeline):
    stage0, _ = overlapped_pipeline
    settings = stage0.status()["speculative"]
    assert settings["overlap"] and settings["run_ahead"] and settings["window_policy"] == "auto"
    hits = misses = 0
    for prompt in PROMPTS:
        plain = complete(stage0, prompt, {"enabled": False})["choices"][0]["text"]
        for window in ({"window": 4}, None):  # None: the server's auto window
            reply = complete(stage0, prompt, window)
            usage = reply["usage"]["speculative"]
            assert reply["choices"][0]["text"] == plain, (prompt, window)
            assert usage["overlap"] and usage["run_ahead"] and usage["drafted"] > 0
            assert usage["window_policy"] == ("fixed" if window else "auto")
            assert sum(steps for _, steps in usage["windows"]) == usage["target_passes"]
            hits += usage["overlap_hits"]
            misses += usage["overlap_misses"]
    assert hits > 0  # prepared windows were used (the draft is the target's GGUF blocks held exactly)
    costs = stage0.status()["speculative"]["costs"]
    assert costs["formula"].startswith("gain(w)") and costs["draft_s_per_token"] > 0
    assert costs["pass_fixed_s"] > 0 and costs["last_choice"] is not None


@TWO_STAGES
def test_a_request_cancelled_mid_step_leaves_both_caches_clean(overlapped_pipeline):
    stage0, _ = overlapped_pipeline
    prompt = PROMPTS[1]
    plain = complete(stage0, prompt, {"enabled": False})["choices"][0]["text"]
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True,
            "speculative": {"window": 4}}
    with httpx.stream("POST", f"{stage0.url}/v1/completions", json=body, timeout=120) as reply:
        chunks = 0
        for line in reply.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 7:  # inside the second window, the third sent ahead
                break
    assert complete(stage0, prompt, {"window": 4})["choices"][0]["text"] == plain


@TWO_STAGES
def test_a_stale_window_sent_ahead_is_rolled_back_by_its_correction(overlapped_pipeline, smollm2_package):
    _, stages = overlapped_pipeline
    hidden = json.loads((smollm2_package / "model-package.json").read_text())["config"]["hidden_size"]
    rng = np.random.default_rng(0)
    prefix, stale, correction = (rng.standard_normal((1, n, hidden)).astype(np.float32) for n in (256, 4, 2))
    connection = activation_connection(stages[0].endpoint)
    try:
        # Run-ahead: the stale window follows the prefix at once, its correction before any answer.
        connection.send(batch_frame(1, [("ahead", 0, prefix)]))
        connection.send(batch_frame(2, [("ahead", 256, stale)]))
        connection.send(batch_frame(3, [("ahead", 256, correction)]))
        answers = [connection.receive() for _ in range(3)]
        assert [a.WhichOneof("body") for a in answers] == ["batch", "batch", "batch"]
        assert [a.seq for a in answers] == [1, 2, 3]
        # The same frames without the stale window give the same hidden states.
        connection.call(batch_frame(4, [("clean", 0, prefix)]))
        clean = connection.call(batch_frame(5, [("clean", 256, correction)]))
    finally:
        connection.close()
    got, want = (np.frombuffer(a.batch.activations.data, dtype=np.float32) for a in (answers[2], clean))
    assert np.allclose(got, want, atol=1e-5)
