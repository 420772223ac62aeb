"""A stream survives a stage's loss (issue 28, item 3): real stage processes on loopback, a peer
killed with SIGKILL in the middle of streaming requests, spares named with --spare."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from helpers import Stage0Process, StageProcess

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "In the beginning"]
MAX_TOKENS = 120
SPLIT = "0:2,2:3,3:4"  # stage 0, then two peers: killing either tests a relink


@pytest.fixture
def stages(tmp_path: Path):
    """Start peers with `start(name, port=None, broken_disk=False)`, each with a cache of its own;
    all stopped after. A broken disk cannot hold the files it fetches: that peer's Prepare fails."""
    started: list[StageProcess] = []

    def start(name: str, port: int | None = None, broken_disk: bool = False,
              args: tuple[str, ...] = ()) -> StageProcess:
        cache = tmp_path / name
        cache.mkdir(exist_ok=True)
        if broken_disk:
            for folder in ("blobs", "packages"):
                (cache / folder).write_text("not a folder")
        stage = StageProcess(args, cache, port)
        started.append(stage)
        return stage

    yield start
    for stage in started:
        if stage.process.popen.poll() is None:
            stage.stop()


@pytest.fixture
def stage0s(tmp_path: Path):
    """Start stage 0 with `start(package, peers, *args)`; stopped after. The package is named by a
    path relative to stage 0's folder, so the peers (elsewhere) fetch its files from stage 0."""
    started: list[Stage0Process] = []

    def start(package: Path, peers: list[str], *args: str) -> Stage0Process:
        stage0 = Stage0Process(Path(package.name), peers, tmp_path, "--split", SPLIT, "--no-draft", *args,
                               cwd=package.parent)
        started.append(stage0)
        return stage0

    yield start
    for stage0 in started:
        stage0.stop()


def stream_during(client: openai.OpenAI, model: str, fault) -> list[str | BaseException]:
    """Stream PROMPTS at once (greedy), run `fault()` once every stream has sent a few chunks;
    each stream's text, or what it raised."""
    going = threading.Semaphore(0)

    def read(prompt: str) -> str:
        text = []
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                               temperature=0, stream=True):
            text.append(chunk.choices[0].text)
            if len(text) == 3:
                going.release()
        return "".join(text)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(read, prompt) for prompt in PROMPTS]
        for _ in PROMPTS:
            assert going.acquire(timeout=60)
        fault()
        return [f.exception() or f.result() for f in futures]


def greedy(client: openai.OpenAI, model: str, prompts: list[str] = PROMPTS) -> list[str]:
    return [client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0).choices[0].text for prompt in prompts]


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.parametrize("lost", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_streams_continue_on_a_spare_with_the_same_text_when_a_peer_is_killed(
        tiny_llama_package, stages, stage0s, lost):
    peers = [stages("peer1"), stages("peer2")]
    spare = stages("spare")
    stage0 = stage0s(tiny_llama_package, [p.endpoint for p in peers], "--spare", spare.endpoint)
    client = stage0.client
    model = stage0.status()["model"]
    reference = greedy(client, model)

    texts = stream_during(client, model, peers[lost - 1].kill)

    assert texts == reference
    status = stage0.status()
    pause = status["pipeline"]["pauses"][-1]
    assert pause["stage"] == lost and pause["replacement"] == spare.endpoint
    assert pause["state"] == "repaired" and pause["replayed_sessions"] >= 1
    assert pause["claimed_s"] <= pause["loaded_s"] <= pause["replayed_s"]
    assert status["stages"][lost]["endpoint"] == spare.endpoint
    assert status["pipeline"]["spares"] == [peers[lost - 1].endpoint]  # should it come back
    assert status["ready"] and status["health"] == "ok"
    assert greedy(client, model, PROMPTS[:1]) == reference[:1]  # and requests after it too


@pytest.mark.slow
def test_with_discover_a_free_stage_of_the_cluster_found_on_the_lan_replaces_a_killed_peer(
        tiny_llama_package, stages, stage0s):
    cluster = ("--cluster", f"test-{uuid.uuid4().hex[:8]}")  # other tests' stages advertise too
    peers = [stages("peer1", args=cluster), stages("peer2", args=cluster)]
    stage0 = stage0s(tiny_llama_package, [p.endpoint for p in peers], "--discover", "--cluster",
                     cluster[1], "--discover-seconds", "1")
    client = stage0.client
    model = stage0.status()["model"]
    reference = greedy(client, model)
    spare = stages("spare", args=cluster)  # after start-up, so only a failover can claim it

    assert stream_during(client, model, peers[1].kill) == reference
    pause = stage0.status()["pipeline"]["pauses"][-1]
    assert pause["replacement"] == spare.endpoint and pause["state"] == "repaired"


@pytest.mark.slow
def test_a_spare_that_fails_to_prepare_is_released_and_the_next_one_replaces_the_stage(
        tiny_llama_package, stages, stage0s):
    peers = [stages("peer1"), stages("peer2")]
    broken, spare = stages("broken", broken_disk=True), stages("spare")
    stage0 = stage0s(tiny_llama_package, [p.endpoint for p in peers],
                     "--spare", broken.endpoint, "--spare", spare.endpoint)
    client = stage0.client
    model = stage0.status()["model"]
    reference = greedy(client, model)

    assert stream_during(client, model, peers[1].kill) == reference
    pause = stage0.status()["pipeline"]["pauses"][-1]
    assert pause["replacement"] == spare.endpoint
    assert any(tried.startswith(f"{broken.endpoint}:") and "prepare" in tried for tried in pause["tried"])


@pytest.mark.slow
def test_without_a_working_spare_requests_end_with_a_clear_error_then_the_lost_peer_rejoins(
        tiny_llama_package, stages, stage0s):
    peers = [stages("peer1"), stages("peer2")]
    broken = stages("broken", broken_disk=True)
    stage0 = stage0s(tiny_llama_package, [p.endpoint for p in peers], "--spare", broken.endpoint,
                     "--failover-seconds", "3")
    client = stage0.client
    model = stage0.status()["model"]
    reference = greedy(client, model)

    outcomes = stream_during(client, model, peers[1].kill)

    for outcome in outcomes:
        assert isinstance(outcome, openai.APIError), outcome
        assert "no spare replaced it within 3 s" in str(outcome) and broken.endpoint in str(outcome)
    status = stage0.status()
    assert status["pipeline"]["state"] == "degraded" and status["health"] == "degraded"
    health = httpx.get(f"{stage0.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "degraded"

    back = stages("peer2-again", port=peers[1].port)  # the lost peer, restarted: it rejoins
    wait_for(lambda: stage0.status()["ready"], 60, "the restarted peer was not claimed again")
    status = stage0.status()
    assert status["pipeline"]["state"] == "ok" and status["stages"][2]["endpoint"] == back.endpoint
    assert len({s["endpoint"] for s in status["stages"]}) == 3  # claimed once, in one place
    assert greedy(client, model, PROMPTS[:1]) == reference[:1]

