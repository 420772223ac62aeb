"""A stage under hostile gRPC callers (issue 13, items 2, 4, 11, 13, 14, 15): bounded fencing,
stream limits that keep control calls answered, protocol answers as documented, no serving
beyond loopback without a token, and manifests that cannot crash a reader."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from layerline.errors import StageUnavailableError
from layerline.proto import activation_pb2 as act_pb
from layerline.proto import stage_control_pb2 as pb
from layerline.runtime.bench.processes import free_port
from layerline.runtime.stage.activation import ActivationRelay
from layerline.runtime.stage.client import ActivationAddress, StageClient, StageRejectedError
from layerline.runtime.stage.frame_budget import FrameBudget
from layerline.runtime.stage.frame_transport import (
    ConnectionRefusedByStage,
    FrameConnection,
    read_message,
    write_message,
)
from layerline.runtime.stage.grpc_options import CLIENT_OPTIONS, SERVER_OPTIONS
from layerline.runtime.stage.model import load_stage_model
from layerline.runtime.stage.node import StageNode

from helpers import Clock, Stage0Process, batch_frame


def client(endpoint: str, term: int, who: str = "coord-a") -> StageClient:
    return StageClient(endpoint, coordinator_id=who, term=term, run_id=f"run-{who}")


def rejected(call) -> pb.Rejected:
    with pytest.raises(StageRejectedError) as caught:
        call()
    return caught.value.rejected


@pytest.mark.parametrize(("term", "lease_ms"), [(2**64 - 1, 30_000), (1, 10**15), (1, 2**64 - 1),
                                                (int(time.time() * 1000) + 3_600_000, 30_000)],
                         ids=["term-max", "lease-huge", "lease-max", "term-an-hour-ahead"])
def test_out_of_range_terms_and_leases_are_bad_requests_and_leave_the_stage_free(stage_process, term,
                                                                                  lease_ms):
    endpoint = stage_process()
    attacker = client(endpoint, term, "attacker")
    claim = pb.Claim(package=pb.PackageIdentity(ref="pkg"), lease_duration_ms=lease_ms)
    refusal = rejected(lambda: attacker.call(claim=claim))
    assert refusal.reason == pb.REJECT_REASON_BAD_REQUEST
    status = attacker.status()
    assert status.state == pb.STAGE_STATE_FREE and not status.holder_coordinator_id
    legit = client(endpoint, int(time.time() * 1000))
    assert legit.call(claim=pb.Claim(package=pb.PackageIdentity(ref="pkg"),
                                     lease_duration_ms=60_000)).WhichOneof("response") == "claim_accepted"


def test_requests_are_answered_as_the_protocol_says(stage_process, tiny_llama_package, tmp_path):
    endpoint = stage_process()
    coordinator = client(endpoint, 7)
    refusal = rejected(lambda: coordinator.call())  # no variant set
    assert refusal.reason == pb.REJECT_REASON_BAD_REQUEST
    coordinator.call(claim=pb.Claim(package=pb.PackageIdentity(ref=str(tiny_llama_package)),
                                    lease_duration_ms=30_000))
    for start, end in ((3, 1), (2, 2), (0, 99)):
        refusal = rejected(lambda s=start, e=end: coordinator.call(
            prepare=pb.Prepare(layers=pb.LayerRange(start=s, end=e))))
        assert refusal.reason == pb.REJECT_REASON_BAD_REQUEST, (start, end)
    coordinator.call(prepare=pb.Prepare(layers=pb.LayerRange(start=1, end=3)))
    deadline = time.monotonic() + 60
    while coordinator.call(inventory=pb.InventoryRequest()).inventory.state != pb.INVENTORY_STATE_READY:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    load = pb.StageLoadRequest(layers=pb.LayerRange(start=1, end=3), stage_index=1, stage_count=2,
                               kv_cache=pb.KvCacheConfig(context_length=64, max_sessions=2))
    refusal = rejected(lambda: coordinator.call(load=load))  # wire_dtype left UNSPECIFIED
    assert refusal.reason == pb.REJECT_REASON_BAD_REQUEST and "wire_dtype" in refusal.message


def test_a_package_ref_error_says_nothing_of_which_paths_exist(stage_process, tmp_path):
    endpoint = stage_process()
    errors = []
    for term, ref in ((1, str(tmp_path)), (2, str(tmp_path / "no-such-folder"))):
        coordinator = client(endpoint, term, f"coord-{term}")
        coordinator.call(claim=pb.Claim(package=pb.PackageIdentity(ref=ref), lease_duration_ms=30_000))
        coordinator.call(prepare=pb.Prepare(layers=pb.LayerRange(start=0, end=1)))
        deadline = time.monotonic() + 30
        while (inventory := coordinator.call(inventory=pb.InventoryRequest()).inventory).state == \
                pb.INVENTORY_STATE_PREPARING:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        errors.append(inventory.error.replace(ref, "REF"))
    assert errors[0] == errors[1] and "REF" in errors[0]


def test_idle_and_surplus_activation_connections_cannot_starve_control_calls(stage_process):
    endpoint = stage_process("--max-connections", "4", "--connection-idle-seconds", "2")
    address = ActivationAddress(endpoint).get()
    held, refused = [], []
    for _ in range(34):
        try:
            held.append(FrameConnection(address, budget=FrameBudget(10.0)))
        except ConnectionRefusedByStage as exc:
            refused.append(exc.code)
    assert len(held) == 4 and refused == [act_pb.ACTIVATION_ERROR_CODE_TOO_MANY_CONNECTIONS] * 30
    started = time.monotonic()
    assert client(endpoint, 1).status().state == pb.STAGE_STATE_FREE  # answered while 4 sit idle
    assert time.monotonic() - started < 1.0
    time.sleep(3)  # past the idle limit: the stage has closed them
    frame = act_pb.ActivationFrame(session_id="s", seq=1, end_session=act_pb.EndSession())
    for connection in held:
        with pytest.raises(StageUnavailableError):
            connection.call(frame)
    FrameConnection(address, budget=FrameBudget(10.0)).close()  # room again


def test_a_stage_beyond_loopback_needs_a_token_or_insecure(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "layerline", "stage", "serve", "--listen", f"0.0.0.0:{port}",
               "--cache-dir", str(tmp_path)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--auth-token-file" in refused.stderr
    assert "Traceback" not in refused.stderr
    insecure = subprocess.Popen([*command, "--insecure"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        assert "listening on" in insecure.stdout.readline()
    finally:
        insecure.terminate()
        assert insecure.wait(timeout=15) == 0
    assert "event=insecure" in insecure.stderr.read()


def test_keepalive_pings_are_never_faster_than_servers_accept():
    client_ping = dict(CLIENT_OPTIONS)["grpc.keepalive_time_ms"]
    server_floor = dict(SERVER_OPTIONS)["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert server_floor <= client_ping and dict(SERVER_OPTIONS)["grpc.keepalive_permit_without_calls"]


def _loaded_node(package: Path, cache: Path, clock: Clock) -> StageNode:
    """A stage node in this process, claimed by "coord" with a 5 s lease and loaded with layers
    1..4 of `package` (context 64, two sessions)."""
    node = StageNode("127.0.0.1:0", cache, load_stage_model, clock=clock)
    request = {"coordinator_id": "coord", "term": 1, "run_id": "run"}
    claim = pb.Claim(package=pb.PackageIdentity(ref=str(package)), lease_duration_ms=5000)
    node.handle(pb.StageControlRequest(**request, claim=claim))
    node.handle(pb.StageControlRequest(**request, prepare=pb.Prepare(layers=pb.LayerRange(start=1, end=4))))
    node.preparation.wait(60)
    node.handle(pb.StageControlRequest(**request, load=pb.StageLoadRequest(
        layers=pb.LayerRange(start=1, end=4), stage_index=1, stage_count=2, wire_dtype=act_pb.WIRE_DTYPE_F32,
        kv_cache=pb.KvCacheConfig(context_length=64, max_sessions=2))))
    return node


def test_a_lapsed_lease_never_unloads_a_model_while_its_sessions_run(tiny_llama_package, tmp_path):
    clock = Clock()
    node = _loaded_node(tiny_llama_package, tmp_path, clock)
    relay = ActivationRelay(node)
    hidden = np.zeros((1, 1, 64), dtype=np.float32)
    assert relay.answer(batch_frame(1, [("s", 0, hidden)])).WhichOneof("body") == "batch"
    clock.now += 60  # the lease lapses while session s is open
    assert relay.answer(batch_frame(2, [("s", 1, hidden)])).WhichOneof("body") == "batch"
    relay.answer(act_pb.ActivationFrame(session_id="s", seq=3, end_session=act_pb.EndSession()))
    assert node.serving() is None  # no session left: now it unloads


@pytest.mark.parametrize(("change", "says"), [
    (lambda raw: raw["config"].update(num_attention_heads=0), "config.num_attention_heads"),
    (lambda raw: raw["config"].update(hidden_size=10**9), "config.hidden_size"),
    (lambda raw: raw["config"].update(vocab_size="many"), "config.vocab_size"),
    (lambda raw: raw["config"].pop("hidden_size"), "config.hidden_size"),
    (lambda raw: raw["config"].update(num_key_value_heads=3), "num_key_value_heads"),
])
def test_bad_model_dimensions_in_a_manifest_are_an_error_line(tiny_llama_package, tmp_path, change, says):
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = json.loads((tiny_llama_package / "model-package.json").read_text())
    change(raw)
    (bad / "model-package.json").write_text(json.dumps(raw))
    done = subprocess.run([sys.executable, "-m", "layerline", "pkg", "inspect", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "error:" in done.stderr and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_manifest_nested_too_deep_is_an_error_line(tmp_path: Path):
    (tmp_path / "model-package.json").write_text("[" * 100_000 + "]" * 100_000)
    done = subprocess.run([sys.executable, "-m", "layerline", "pkg", "inspect", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "nests JSON too deeply" in done.stderr and "Traceback" not in done.stderr


def _rss_mib(stage) -> float:
    status = Path(f"/proc/{stage.process.popen.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def _token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("s3cret-token")
    return path


def test_announced_lengths_cost_nothing_before_the_token_is_checked(stage_processes, tmp_path):
    stage = stage_processes("--auth-token-file", str(_token_file(tmp_path)))
    address = ActivationAddress(stage.endpoint, token="s3cret-token").get()
    host, port = address.rsplit(":", 1)
    before = _rss_mib(stage)
    sockets = []
    for _ in range(40):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall((64 << 20).to_bytes(4, "little") + b"\0\0\0\0")  # a 64 MiB hello, 4 bytes of it
        sockets.append(sock)
    time.sleep(1)
    grown = _rss_mib(stage) - before
    for sock in sockets:
        sock.close()
    assert grown < 100, f"the stage grew by {grown:.0f} MiB"


def test_idle_unauthenticated_connections_do_not_lock_out_a_client_with_the_token(stage_processes, tmp_path):
    stage = stage_processes("--auth-token-file", str(_token_file(tmp_path)), "--max-connections", "4")
    address = ActivationAddress(stage.endpoint, token="s3cret-token").get()
    host, port = address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(70)]
    time.sleep(0.5)
    connection = FrameConnection(address, budget=FrameBudget(10.0), token="s3cret-token")  # admitted
    frame = act_pb.ActivationFrame(session_id="s", seq=1, end_session=act_pb.EndSession())
    assert connection.call(frame).WhichOneof("body") in ("end_session", "error")
    connection.close()
    for sock in idle:
        sock.close()


@pytest.mark.slow
def test_a_hello_dripped_a_byte_at_a_time_is_dropped_at_its_whole_deadline(stage_processes, tmp_path):
    """One byte every 4 s would hold a slot for ever against a per-read timeout: the stage drops the
    connection at the hello's deadline (10 s from accepting it), with bytes still arriving."""
    stage = stage_processes("--auth-token-file", str(_token_file(tmp_path)))
    host, port = ActivationAddress(stage.endpoint, token="s3cret-token").get().rsplit(":", 1)
    data = act_pb.ActivationHello(auth_token="s3cret-token").SerializeToString()
    message = len(data).to_bytes(4, "little") + data
    sock = socket.create_connection((host, int(port)), timeout=4)
    started, dropped_after = time.monotonic(), None
    for byte in message:
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1) == b"":
                dropped_after = time.monotonic() - started
                break
        except TimeoutError:
            continue  # still open: the next byte, 4 s after this one
        except OSError:
            dropped_after = time.monotonic() - started
            break
    sock.close()
    assert dropped_after is not None and dropped_after < 14, dropped_after  # not after its last byte


def test_frames_read_and_unanswered_share_one_memory_budget(stage_processes, tmp_path):
    stage = stage_processes("--auth-token-file", str(_token_file(tmp_path)), "--frame-memory-mb", "64")
    address = ActivationAddress(stage.endpoint, token="s3cret-token").get()
    before = _rss_mib(stage)
    host, port = address.rsplit(":", 1)
    held = []
    for _ in range(40):
        sock = socket.create_connection((host, int(port)), timeout=10)
        write_message(sock, act_pb.ActivationHello(auth_token="s3cret-token"))
        assert not read_message(sock, act_pb.ActivationHello).error
        # A frame of 64 MiB announced, 8 MiB of it sent, the rest never: one fits the budget at a time.
        sock.setblocking(False)
        try:
            sock.send((64 << 20).to_bytes(4, "little") + bytes(8 << 20))
        except BlockingIOError:
            pass
        held.append(sock)
    time.sleep(2)
    grown = _rss_mib(stage) - before
    for sock in held:
        sock.close()
    assert grown < 100, f"the stage grew by {grown:.0f} MiB"


def test_whole_frames_never_answered_on_one_connection_cost_a_bounded_memory(stage_processes, tmp_path):
    """300 frames of 4 MiB on one connection whose answers are never read: the stage reads no
    faster than it can answer, so its memory stays bounded, and it keeps serving other clients."""
    stage = stage_processes("--auth-token-file", str(_token_file(tmp_path)))
    address = ActivationAddress(stage.endpoint, token="s3cret-token").get()
    host, port = address.rsplit(":", 1)
    before = _rss_mib(stage)
    hidden = np.zeros((1, 16384, 64), dtype=np.float32)  # 4 MiB of hidden states
    frame = batch_frame(1, [("flood", 0, hidden)]).SerializeToString()
    message = len(frame).to_bytes(4, "little") + frame
    sock = socket.create_connection((host, int(port)), timeout=10)
    write_message(sock, act_pb.ActivationHello(auth_token="s3cret-token"))
    assert not read_message(sock, act_pb.ActivationHello).error
    sock.settimeout(2)  # the stage stops reading once its answers are not read: stop sending then
    sent, peak = 0, 0.0
    try:
        for sent in range(1, 301):
            sock.sendall(message)
            if sent % 20 == 0:
                peak = max(peak, _rss_mib(stage) - before)
    except TimeoutError:
        pass
    time.sleep(1)
    peak = max(peak, _rss_mib(stage) - before)
    other = FrameConnection(address, budget=FrameBudget(10.0), token="s3cret-token")
    end = act_pb.ActivationFrame(session_id="s", seq=1, end_session=act_pb.EndSession())
    assert other.call(end).WhichOneof("body") in ("end_session", "error")
    other.close()
    status = StageClient(stage.endpoint, coordinator_id="coord-a", term=1, run_id="run-a",
                         token="s3cret-token").status()
    assert status.state == pb.STAGE_STATE_FREE
    sock.close()
    assert peak < 300, f"the stage grew by {peak:.0f} MiB after {sent} frames"


def test_an_end_session_on_one_connection_leaves_another_connections_session(tiny_llama_package, tmp_path):
    node = _loaded_node(tiny_llama_package, tmp_path, Clock())
    owner, other = ActivationRelay(node), ActivationRelay(node)
    hidden = np.zeros((1, 1, 64), dtype=np.float32)
    assert owner.answer(batch_frame(1, [("s", 0, hidden)])).WhichOneof("body") == "batch"
    other.answer(act_pb.ActivationFrame(session_id="s", seq=1, end_session=act_pb.EndSession()))
    assert node.loaded.model.session_count() == 1  # still the owner's
    owner.answer(act_pb.ActivationFrame(session_id="s", seq=2, end_session=act_pb.EndSession()))
    assert node.loaded.model.session_count() == 0


def test_a_huge_coordinator_id_is_a_bad_request(stage_process):
    endpoint = stage_process()
    refusal = rejected(lambda: client(endpoint, 1, "c" * 300).call(
        claim=pb.Claim(package=pb.PackageIdentity(ref="pkg"), lease_duration_ms=30_000)))
    assert refusal.reason == pb.REJECT_REASON_BAD_REQUEST and "at most 256" in refusal.message
    assert client(endpoint, 1).status().state == pb.STAGE_STATE_FREE


def test_a_huge_run_id_is_a_bad_request(stage_process):
    endpoint = stage_process()
    huge = StageClient(endpoint, coordinator_id="coord-a", term=1, run_id="r" * 300)
    refusal = rejected(lambda: huge.call(
        claim=pb.Claim(package=pb.PackageIdentity(ref="pkg"), lease_duration_ms=30_000)))
    assert refusal.reason == pb.REJECT_REASON_BAD_REQUEST and "at most 256" in refusal.message
    status = client(endpoint, 1).status()
    assert status.state == pb.STAGE_STATE_FREE and not status.holder_coordinator_id


@pytest.mark.slow
def test_health_is_503_with_why_as_soon_as_stage_0_loses_a_stages_claim(tiny_llama_package, stage_processes,
                                                                         tmp_path):
    peer = stage_processes()
    stage0 = Stage0Process(tiny_llama_package, [peer.endpoint], tmp_path, "--split", "0:2,2:4", "--no-draft")
    try:
        assert httpx.get(f"{stage0.url}/health", timeout=10).status_code == 200
        attacker = client(peer.endpoint, int(time.time() * 1000) + 60_000, "attacker")
        attacker.call(claim=pb.Claim(package=pb.PackageIdentity(ref="pkg"), lease_duration_ms=60_000))
        # At once, not at the next heartbeat: /health asks the stage itself.
        health = httpx.get(f"{stage0.url}/health", timeout=10)
        assert health.status_code == 503, health.text
        reason = health.json()["reason"]
        assert reason.startswith(f"stage 1 ({peer.endpoint}, layers 2..4) is down") and "attacker" in reason
        assert httpx.post(f"{stage0.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                          timeout=30).status_code == 503
        # Once the stage is free again the heartbeat claims and loads it anew, and /health says so.
        attacker.call(release=pb.Release())
        deadline = time.monotonic() + 60
        while httpx.get(f"{stage0.url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        stage0.stop()
