"""`/v1/draft` on a running stage 0 with a downstream stage: a draft set while a request
streams switches between requests, clearing it turns speculation off, a draft with another
tokenizer and requests without the admin token are refused."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from layerline.errors import ManifestError
from layerline.packager.manifest import MANIFEST_NAME, parse_manifest
from layerline.runtime.serve.config import ConfigError, parse_config

from helpers import Stage0Process, admin_pipeline

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADMIN_TOKEN = "draft-api-test-secret"
PROMPT = "Once upon a time"  # greedy SmolLM2 writes past 96 tokens without an end token
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stage0(smollm2_package: Path, tmp_path_factory: pytest.TempPathFactory):
    """Stage 0 (layers 0..15, admin token set, no draft at start) over one peer (15..30)."""
    root = tmp_path_factory.mktemp("draft-api")
    with admin_pipeline(smollm2_package, root, "0:15,15:30", ADMIN_TOKEN) as (server, _peer):
        yield server


@pytest.fixture(scope="module")
def other_tokenizer_model(tiny_llama: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with one BPE merge fewer: a real model whose tokenizer differs from SmolLM2's."""
    folder = shutil.copytree(tiny_llama["folder"], tmp_path_factory.mktemp("other-tokenizer") / "model")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:-1]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def draft_api(stage0: Stage0Process, method: str, body: dict | None = None, *,
              token: str | None = ADMIN_TOKEN) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"{stage0.url}/v1/draft", json=body, headers=headers, timeout=60)


def wait_for_switch(stage0: Stage0Process, timeout: float = 180) -> dict:
    """The draft state once no draft is pending any more (loaded and switched, or failed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = draft_api(stage0, "GET").json()
        if state["pending_draft"] is None:
            return state
        time.sleep(0.1)
    raise AssertionError(f"the draft did not switch in {timeout} s: {state}")


def use_draft(stage0: Stage0Process, draft: Path, **windows: object) -> dict:
    """Set `draft` and wait until requests speculate with it."""
    reply = draft_api(stage0, "PUT", {"draft_model": str(draft), **windows})
    assert reply.status_code in (200, 202), reply.text
    state = wait_for_switch(stage0)
    assert state["active"], state
    return state


@pytest.mark.slow
def test_a_draft_set_mid_stream_leaves_that_request_unharmed_and_the_next_uses_it(
        stage0, smollm2_f32_package):
    assert draft_api(stage0, "DELETE").status_code == 200  # start without speculation
    finished_before = stage0.metric("layerline_requests_total", endpoint="/v1/completions", status="ok")
    accepted_before = stage0.metric("layerline_speculative_accepted_tokens_total")

    stream = iter(stage0.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=96, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    chunks = [next(stream)]  # the request is generating
    reply = draft_api(stage0, "PUT", {"draft_model": str(smollm2_f32_package), "window_policy": "adaptive",
                                      "initial_window": 4, "min_window": 2, "max_window": 8})
    assert reply.status_code == 202, reply.text
    assert reply.json()["pending_draft"]["state"] == "loading" and not reply.json()["active"]
    state = wait_for_switch(stage0)
    finished_at_switch = stage0.metric("layerline_requests_total", endpoint="/v1/completions",
                                status="ok")
    chunks += list(stream)

    assert finished_at_switch == finished_before, "the request ended before the switch: make it longer"
    assert state["active"] and state["draft"]["state"] == "ready"
    assert state["draft_model"] == str(smollm2_f32_package) and state["window_policy"] == "adaptive"
    assert state["sources"]["draft_model"] == "runtime PUT /v1/draft"
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage.completion_tokens == 96
    assert usage.speculative["enabled"] is False  # it kept the settings it started with

    after = stage0.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    speculative = after.usage.speculative
    assert speculative["enabled"] and speculative["strategy"] == "smollm2-f32"
    assert speculative["accepted"] > 0 and speculative["tokens_per_pass"] > 1
    assert streamed.startswith(after.choices[0].text)  # greedy speculation changes only the speed
    assert stage0.metric("layerline_speculative_accepted_tokens_total") > accepted_before
    assert stage0.metric("layerline_speculative_accept_rate") > 0


def test_a_new_window_policy_for_the_loaded_draft_applies_at_once(stage0, smollm2_f32_package):
    use_draft(stage0, smollm2_f32_package)
    reply = draft_api(stage0, "PUT", {"draft_model": str(smollm2_f32_package), "window_policy": "fixed",
                                      "initial_window": 3})
    assert reply.status_code == 200, reply.text  # same draft: no reload
    state = reply.json()
    assert state["active"] and state["window_policy"] == "fixed" and state["initial_window"] == 3
    assert state["sources"]["window_policy"] == "runtime PUT /v1/draft"
    answer = stage0.client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                                   temperature=0)
    assert answer.usage.speculative["window_policy"] == "fixed"


def test_prompt_lookup_drafting_needs_no_model_and_applies_at_once(stage0):
    reply = draft_api(stage0, "PUT", {"draft_model": "ngram", "window_policy": "fixed", "initial_window": 4,
                                      "min_window": 2, "max_window": 8})
    assert reply.status_code == 200, reply.text
    assert reply.json()["active"] and reply.json()["type"] == "ngram"
    answer = stage0.client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                                   temperature=0)
    assert answer.usage.speculative["enabled"] and answer.usage.speculative["strategy"] == "ngram"


def test_clearing_the_draft_turns_speculation_off_for_the_next_request(stage0, smollm2_f32_package):
    use_draft(stage0, smollm2_f32_package)
    plain_before = stage0.metric("layerline_speculative_requests_total", mode="plain")

    reply = draft_api(stage0, "DELETE")
    assert reply.status_code == 200
    state = reply.json()
    assert not state["enabled"] and not state["active"] and state["draft"]["state"] == "none"
    assert state["sources"]["enabled"] == "runtime DELETE /v1/draft"
    assert "DELETE /v1/draft" in state["inactive_reason"]

    answer = stage0.client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                                   temperature=0)
    assert answer.usage.speculative["enabled"] is False
    assert "DELETE /v1/draft" in answer.usage.speculative["reason"]
    assert stage0.metric("layerline_speculative_requests_total", mode="plain") == plain_before + 1


def test_a_draft_with_another_tokenizer_is_refused_with_the_reason(stage0, other_tokenizer_model,
                                                                    smollm2_package):
    before = draft_api(stage0, "GET").json()
    reply = draft_api(stage0, "PUT", {"draft_model": str(other_tokenizer_model)})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "tokenizer_mismatch" and error["param"] == "draft_model"
    target = json.loads((smollm2_package / "model-package.json").read_text())["tokenizer"]["fingerprint"]
    assert "tokenizer" in error["message"] and target in error["message"]
    assert draft_api(stage0, "GET").json() == before  # nothing loads, nothing changes


def test_a_draft_that_fails_to_load_leaves_the_settings_and_says_why(stage0):
    before = draft_api(stage0, "GET").json()
    reply = draft_api(stage0, "PUT", {"draft_model": "layerline-tests/no-such-draft"})
    assert reply.status_code == 202, reply.text  # a Hub draft is only checked once fetched
    state = wait_for_switch(stage0)
    failed = state["failed_draft"]
    assert failed["state"] == "failed" and failed["reference"] == "layerline-tests/no-such-draft"
    assert "layerline-tests/no-such-draft" in failed["reason"]
    settings = ("enabled", "draft_model", "window_policy", "active", "draft")
    assert {k: state[k] for k in settings} == {k: before[k] for k in settings}


def test_an_out_of_range_window_gets_the_same_message_everywhere(stage0, smollm2_package):
    says = ["draft window 100 is out of range", "a draft window is 1 to 64 tokens"]
    raw = json.loads((smollm2_package / MANIFEST_NAME).read_text())
    raw["generation"] = {"speculative_decoding": {"default": "lookup", "strategies": {"lookup": {
        "type": "ngram", "window_policy": "fixed", "initial_window": 100}}}}
    with pytest.raises(ManifestError) as from_manifest:
        parse_manifest(raw)
    toml = {"defaults": {"speculative": {"type": "ngram", "window_policy": "fixed", "initial_window": 100}}}
    with pytest.raises(ConfigError) as from_config:
        parse_config(toml)
    from_put = draft_api(stage0, "PUT", {"draft_model": "ngram", "window_policy": "fixed",
                                         "initial_window": 100})
    from_request = httpx.post(f"{stage0.url}/v1/completions", timeout=60, json={
        "prompt": PROMPT, "max_tokens": 4, "speculative": {"window": 100}})
    assert from_put.status_code == from_request.status_code == 400
    for message in (str(from_manifest.value), str(from_config.value),
                    from_put.json()["error"]["message"], from_request.json()["error"]["message"]):
        assert all(part in message for part in says), message


@pytest.mark.parametrize(("body", "says"), [
    ({"draft_model": "{draft}-missing"}, "does not exist"),
    ({"draft_model": "{draft}", "window_policy": "adaptive", "min_window": 9, "max_window": 4},
     "out of order: min_window 9"),
    ({"draft_model": "{draft}", "window_policy": "sometimes"}, "window policy 'sometimes' is unknown"),
    ({"draft_model": "{draft}", "window": "fixed"}, "window"),
    ({"window_policy": "fixed"}, "draft_model"),
])
def test_bad_draft_requests_are_refused_with_400_and_the_fix(stage0, smollm2_f32_package, body, says):
    body = {k: v.replace("{draft}", str(smollm2_f32_package)) if isinstance(v, str) else v
            for k, v in body.items()}
    reply = draft_api(stage0, "PUT", body)
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]["message"]


@pytest.mark.parametrize("reference", ["/etc/passwd", "/etc/no-such-file", "./no/such/draft",
                                       "other-org/model"])
def test_drafts_outside_the_roots_and_the_hub_allow_list_are_refused_alike(stage0, reference):
    reply = draft_api(stage0, "PUT", {"draft_model": reference})
    assert reply.status_code == 403, reply.text
    error = reply.json()["error"]
    assert error["code"] == "draft_not_allowed" and error["param"] == "draft_model"
    assert "root:" not in reply.text and "b'" not in reply.text  # nothing of what the file holds
    assert "exist" not in error["message"]


def test_the_draft_api_and_the_dashboard_refuse_requests_without_the_admin_token(stage0):
    for method, body in (("GET", None), ("PUT", {"draft_model": "x"}), ("DELETE", None)):
        missing = draft_api(stage0, method, body, token=None)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "admin_token_required"
        assert "--admin-token-file" in missing.json()["error"]["message"]
        wrong = draft_api(stage0, method, body, token="not-the-token")
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_token"
    page = httpx.get(f"{stage0.url}/", timeout=10)
    assert page.status_code == 401 and "admin token" in page.text and 'name="token"' in page.text
    assert httpx.get(f"{stage0.url}/dashboard/dashboard.js", timeout=10).status_code == 401
    assert httpx.get(f"{stage0.url}/v1/models", timeout=10).status_code == 200  # the OpenAI API stays open

    with httpx.Client(base_url=stage0.url, timeout=10) as browser:
        refused = browser.post("/dashboard/login", data={"token": "not-the-token"})
        assert refused.status_code == 401 and "not the admin token" in refused.text
        signed_in = browser.post("/dashboard/login", data={"token": ADMIN_TOKEN})
        assert signed_in.status_code == 303 and ADMIN_TOKEN not in signed_in.headers["set-cookie"]
        assert browser.get("/").status_code == 200
        assert browser.get("/v1/draft").status_code == 200  # the dashboard's own calls carry the cookie
