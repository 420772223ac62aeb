"""Discovery in real processes (issue 28, item 1): stage 0 with --discover finds and claims the
free stage of its cluster holding its token, on loopback and across two network namespaces
joined by a veth pair, and never one of another cluster or with another token."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from layerline.runtime.bench.processes import Process, free_port, wait_listening

from helpers import Stage0Process, StageProcess


def discovered_after(stage0: Stage0Process) -> float:
    """Seconds from the start of discovery to the peer's advertisement checked, as logged."""
    match = re.search(r"event=discovered .* after_s=([0-9.]+)", stage0.log.read_text())
    assert match, stage0.log.read_text()[-3000:]
    return float(match.group(1))


def complete(stage0: Stage0Process) -> dict:
    body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{stage0.url}/v1/completions", json=body, timeout=120).json()


@pytest.mark.slow
def test_stage0_discovers_and_claims_the_stage_of_its_cluster_and_token_on_loopback(
        tiny_llama_package: Path, tmp_path: Path):
    cluster = f"test-{uuid.uuid4().hex[:8]}"  # other tests' stages on this machine advertise too
    (tmp_path / "token").write_text("our-secret")
    (tmp_path / "their-token").write_text("their-secret")
    stages = {}
    for name, args in {"ours": ("--cluster", cluster, "--auth-token-file", str(tmp_path / "token")),
                       "other-cluster": ("--cluster", f"{cluster}-b", "--auth-token-file",
                                         str(tmp_path / "token")),
                       "other-token": ("--cluster", cluster, "--auth-token-file",
                                       str(tmp_path / "their-token"))}.items():
        (tmp_path / name).mkdir()
        stages[name] = StageProcess(args, tmp_path / name)
    stage0 = None
    try:
        stage0 = Stage0Process(tiny_llama_package, [], tmp_path, "--discover", "--cluster", cluster,
                               "--auth-token-file", str(tmp_path / "token"), "--split", "0:2,2:4",
                               "--no-draft", "--discover-seconds", "3")
        assert [s["endpoint"] for s in stage0.status()["stages"]] == ["local", stages["ours"].endpoint]
        assert "choices" in complete(stage0)
        print(f"discovered after {discovered_after(stage0):.2f} s")
        for name in ("other-cluster", "other-token"):
            assert "event=claimed" not in stages[name].process.log.read_text(), name
        other_token = stages["other-token"].endpoint
        assert f"endpoint={other_token} reason=its token fingerprint is not ours" in stage0.log.read_text()
    finally:
        if stage0 is not None:
            stage0.stop()
        for stage in stages.values():
            stage.stop()


@pytest.fixture
def namespace() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (name, our address, its address)."""
    tag = uuid.uuid4().hex[:6]
    name, ours, theirs = f"ll-{tag}", f"lla{tag}", f"llb{tag}"
    subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    steps = [["ip", "netns", "add", name],
             ["ip", "link", "add", ours, "type", "veth", "peer", "name", theirs],
             ["ip", "link", "set", theirs, "netns", name],
             ["ip", "addr", "add", f"{subnet}.1/24", "dev", ours],
             ["ip", "link", "set", ours, "up"],
             ["ip", "netns", "exec", name, "ip", "addr", "add", f"{subnet}.2/24", "dev", theirs],
             ["ip", "netns", "exec", name, "ip", "link", "set", theirs, "up"],
             ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                pytest.skip(f"network namespaces are not available here: {' '.join(step)}: {done.stderr}")
        yield name, f"{subnet}.1", f"{subnet}.2"
    finally:
        subprocess.run(["ip", "link", "del", ours], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.mark.slow
def test_stage0_discovers_and_claims_a_stage_in_another_network_namespace(
        tiny_llama_package: Path, tmp_path: Path, namespace: tuple[str, str, str]):
    name, ours, theirs = namespace
    cluster = f"test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "token").write_text("our-secret")
    (tmp_path / "peer").mkdir()
    argv = ["ip", "netns", "exec", name, sys.executable, "-m", "layerline", "stage", "serve",
            "--listen", f"{theirs}:{free_port()}", "--cache-dir", str(tmp_path / "peer"),
            "--cluster", cluster, "--auth-token-file", str(tmp_path / "token")]
    peer = Process.start(f"stage in {name}", argv, tmp_path / "peer.log")
    stage0 = None
    try:
        wait_listening(peer, timeout_s=60)
        stage0 = Stage0Process(tiny_llama_package, [], tmp_path, "--discover", "--cluster", cluster,
                               "--auth-token-file", str(tmp_path / "token"), "--listen", f"{ours}:0",
                               "--split", "0:2,2:4", "--no-draft")
        stages = [s["endpoint"] for s in stage0.status()["stages"]]
        assert len(stages) == 2 and stages[1].rpartition(":")[0] == theirs, stages
        assert "choices" in complete(stage0)
        print(f"discovered after {discovered_after(stage0):.2f} s")
    finally:
        if stage0 is not None:
            stage0.stop()
        peer.stop()
