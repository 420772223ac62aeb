"""Faults around requests in flight (issue 13, items 5, 7, 16): SIGTERM after clients left
mid-stream, a peer paused mid-stream, and leases over a long speculative request."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from helpers import Stage0Process, StageProcess, speculating_over_delayed_links

STAGE_TIMEOUT_S = 2.0


def read_stream(url: str, body: dict, *, stop_after: int | None = None) -> tuple[str, dict | None, float]:
    """(text, error chunk or None, seconds until the stream ended) of one streamed completion."""
    started = time.monotonic()
    text: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                return "".join(text), chunk["error"], time.monotonic() - started
            text.append(chunk["choices"][0]["text"])
            if stop_after is not None and len(text) >= stop_after:
                break
    return "".join(text), None, time.monotonic() - started


def wait_health(url: str, code: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == code:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


@pytest.fixture
def three_stages(tiny_llama_package: Path, tmp_path: Path):
    """Stage 0 (0..2) over two peer processes (2..3, 3..4), with a short stage timeout."""
    peers = []
    for i in (1, 2):
        (tmp_path / f"peer{i}").mkdir()
        peers.append(StageProcess((), tmp_path / f"peer{i}"))
    stage0 = Stage0Process(tiny_llama_package, [p.endpoint for p in peers], tmp_path, "--split",
                           "0:2,2:3,3:4", "--no-draft", "--stage-timeout", str(STAGE_TIMEOUT_S),
                           "--drain-seconds", "2")
    yield stage0, peers
    for peer in peers:
        peer.process.popen.send_signal(signal.SIGCONT)
    stage0.stop()
    for peer in peers:
        peer.stop()


def test_sigterm_after_clients_left_mid_stream_stops_every_stage_cleanly(three_stages):
    stage0, peers = three_stages
    for _ in range(2):
        read_stream(stage0.url, {"prompt": "Once upon a time", "max_tokens": 300}, stop_after=4)
    processes = [stage0.process, *(p.process for p in peers)]
    started = time.monotonic()
    for process in processes:
        process.popen.send_signal(signal.SIGTERM)
    for process in processes:
        assert process.popen.wait(timeout=10) == 0, process.tail()
    assert time.monotonic() - started < 10
    for process in processes:
        log = process.log.read_text(errors="replace")
        assert "terminate called" not in log and "Traceback" not in log, log[-2000:]


@pytest.mark.slow
def test_a_paused_peer_fails_the_request_within_the_stage_timeout_and_recovers(three_stages):
    stage0, peers = three_stages
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
    paused_at = []

    def pause_mid_stream() -> None:
        time.sleep(0.3)
        peers[1].process.popen.send_signal(signal.SIGSTOP)
        paused_at.append(time.monotonic())

    import threading

    pauser = threading.Thread(target=pause_mid_stream)
    pauser.start()
    text, error, _ = read_stream(stage0.url, body)
    failed_at = time.monotonic()
    pauser.join()
    assert error is not None and error["code"] == "stage_unavailable", (text, error)
    assert failed_at - paused_at[0] < STAGE_TIMEOUT_S + 1.5, failed_at - paused_at[0]
    assert wait_health(stage0.url, 503, 5)
    peers[1].process.popen.send_signal(signal.SIGCONT)
    assert wait_health(stage0.url, 200, 30)
    assert read_stream(stage0.url, {**body, "max_tokens": 8})[1] is None


@pytest.mark.slow
def test_leases_stay_renewed_through_a_long_speculative_request_over_delayed_links(
        tiny_llama_package, smollm2_f32_package, tmp_path):
    with speculating_over_delayed_links(tiny_llama_package, smollm2_f32_package, tmp_path,
                                        "--lease-seconds", "2") as (stage0, peer, frames_proxy):
        deadline = time.monotonic() + 120
        while not stage0.status()["speculative"]["active"] and time.monotonic() < deadline:
            time.sleep(0.2)
        body = {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}
        plain = httpx.post(f"{stage0.url}/v1/completions", timeout=120,
                           json={**body, "speculative": {"enabled": False}}).json()
        started = time.monotonic()
        drafted = httpx.post(f"{stage0.url}/v1/completions", json=body, timeout=120).json()
        took = time.monotonic() - started
        assert drafted["usage"]["speculative"]["enabled"], drafted["usage"]
        assert drafted["choices"][0]["text"] == plain["choices"][0]["text"]
        assert took > 2, f"the request ({took:.1f} s) must outlast a lease to show renewals"
        assert "lease_lapsed" not in peer.process.log.read_text()
        assert frames_proxy.traffic.bytes_to_target > 0  # the frames took the delayed link
