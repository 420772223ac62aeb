"""Admission control (issue 13, item 3): more clients than sessions. Those beyond the decoding
slots and the queue get 429 before any data; every admitted one streams to the end, with the
answer it gets alone."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

from helpers import Stage0Process, StageProcess

SESSIONS, QUEUE, CLIENTS = 16, 8, 40
PROMPTS = [f"Story number {i}: once upon a time" for i in range(CLIENTS)]


def stream(url: str, prompt: str) -> tuple[int, str, dict]:
    """(status, text, headers) of one streaming completion; text is what arrived before any error."""
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
        if reply.status_code != 200:
            return reply.status_code, reply.read().decode(), dict(reply.headers)
        text = []
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk  # nothing fails mid-stream
            text.append(chunk["choices"][0]["text"])
        return 200, "".join(text), dict(reply.headers)


@pytest.mark.slow
def test_forty_clients_on_sixteen_sessions_none_fails_mid_stream(tiny_llama_package, tmp_path):
    (tmp_path / "peer").mkdir()
    peer = StageProcess(("--max-connections", "24"), tmp_path / "peer")
    stage0 = Stage0Process(tiny_llama_package, [peer.endpoint], tmp_path, "--split", "0:2,2:4", "--no-draft",
                           "--max-sessions", str(SESSIONS), "--max-queue", str(QUEUE))
    try:
        solo = {prompt: stream(stage0.url, prompt)[1] for prompt in PROMPTS}
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda p: (p, *stream(stage0.url, p)), PROMPTS))
        admitted = [(p, text) for p, status, text, _ in results if status == 200]
        refused = [(status, text, headers) for _, status, text, headers in results if status != 200]
        assert len(admitted) >= SESSIONS and refused, [r[0] for r in refused]
        for prompt, text in admitted:
            assert text == solo[prompt], prompt
        for status, text, headers in refused:
            assert status == 429, text
            assert json.loads(text)["error"]["type"] == "rate_limit_exceeded"
            assert int(headers["retry-after"]) >= 1
        status = stage0.status()
        assert status["requests"]["active"] == status["requests"]["queued"] == 0
        assert httpx.get(f"{stage0.url}/health", timeout=10).status_code == 200
    finally:
        stage0.stop()
        peer.stop()
