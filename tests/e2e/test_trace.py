"""Stage 0's per-pass trace over real stage processes: its parts add up to the pass."""

from __future__ import annotations

import json

import httpx

from helpers import Stage0Process, StageProcess


def test_the_traces_parts_add_up_to_each_pass(tiny_llama_package, tmp_path):
    (tmp_path / "peer").mkdir()
    peer = StageProcess((), tmp_path / "peer")
    trace = tmp_path / "trace.jsonl"
    stage0 = Stage0Process(tiny_llama_package, [peer.endpoint], tmp_path, "--split", "0:2,2:4", "--no-draft",
                           "--trace", str(trace))
    try:
        reply = httpx.post(f"{stage0.url}/v1/completions", timeout=60,
                           json={"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0})
        assert reply.status_code == 200
        profile = stage0.status()["profile"]
    finally:
        stage0.stop()
        peer.stop()
    per_pass = profile["ms_per_pass"]
    assert profile["passes"] == 24 and {"stage0_ms", "stage1_ms", "hop0_1_ms", "head_ms"} <= set(per_pass)
    parts = (per_pass["stage0_ms"] + per_pass["hop0_1_ms"] + per_pass["stage1_ms"] + per_pass["head_ms"]
             + per_pass.get("queue_ms", 0.0))
    assert abs(parts - per_pass["target_ms"]) <= 0.05 * per_pass["target_ms"], per_pass
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(steps) == 24 and all(step["tokens"] == 1 and step["stage1_s"] > 0 for step in steps)
