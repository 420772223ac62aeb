"""Leases under load (issue 28, item 4): sixteen speculating clients over delayed links with a
2 s lease; the peer's lease never lapses and stage 0 never takes it for down. And a peer's
renewals do not wait behind other peers that stopped answering."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import pytest

from helpers import Stage0Process, StageProcess, speculating_over_delayed_links, wait_for_draft

CLIENTS = 16


@pytest.mark.slow
def test_no_lease_lapses_under_sixteen_speculating_clients_with_a_two_second_lease(
        tiny_llama_package, smollm2_f32_package, tmp_path):
    with speculating_over_delayed_links(tiny_llama_package, smollm2_f32_package, tmp_path,
                                        "--lease-seconds", "2", "--max-sessions", str(CLIENTS)) as (
            stage0, peer, _):
        wait_for_draft(stage0, "ready")
        body = {"max_tokens": 48, "temperature": 0}
        prompts = [f"Story number {i}: once upon a time" for i in range(CLIENTS)]

        def complete(prompt: str) -> dict:
            return httpx.post(f"{stage0.url}/v1/completions", json={**body, "prompt": prompt},
                              timeout=300).json()

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(complete, prompts))
        for answer in answers:
            assert "choices" in answer, answer
        assert any(a["usage"]["speculative"]["enabled"] for a in answers)
        peer_log = peer.process.log.read_text()
        assert peer_log.count("event=lease_lapsed") == 0, peer_log[-3000:]
        assert "event=stage_down" not in stage0.log.read_text()


@pytest.mark.slow
def test_a_peers_lease_stays_renewed_while_the_peers_before_it_stop_answering(tiny_llama_package, tmp_path):
    peers = []
    for i in range(3):
        (tmp_path / f"peer{i}").mkdir()
        peers.append(StageProcess((), tmp_path / f"peer{i}"))
    stage0 = Stage0Process(tiny_llama_package, [p.endpoint for p in peers], tmp_path, "--split",
                           "0:1,1:2,2:3,3:4", "--no-draft", "--lease-seconds", "2")
    try:
        for peer in peers[:2]:
            peer.process.popen.send_signal(signal.SIGSTOP)
        time.sleep(6)  # three leases: each health check of a stopped peer waits out its timeout
        assert "event=lease_lapsed" not in peers[2].process.log.read_text()
    finally:
        for peer in peers:
            peer.process.popen.send_signal(signal.SIGCONT)
        stage0.stop()
        for peer in peers:
            peer.stop()
