"""Discovery on loopback with real mDNS: a stage's advertisement is found and checked; forged,
foreign, oversized and misdirected ones are ignored with a log line, and nothing is taken."""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from layerline.runtime.stage.discovery import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Announcer,
    DiscoveryError,
    browse,
    check_usable,
    token_fingerprint,
)
from layerline.runtime.stage.server import start_stage_server
from layerline.runtime.stage0.find_peers import find_peers

LOOPBACK = ["127.0.0.1"]
TOKEN = "s3cret-token-for-discovery"


def never_loads(package, options):
    raise AssertionError("this test loads no model")


@pytest.fixture
def cluster() -> str:
    """A cluster of this test's own: other tests' stages on this machine advertise too."""
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def zeroconf():
    zc = Zeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    yield zc
    zc.close()


def forge(zc: Zeroconf, port: int, **fields: str) -> ServiceInfo:
    """Register an advertisement with these TXT fields, pointing at 127.0.0.1:`port`."""
    name = f"forged-{uuid.uuid4().hex[:8]}"
    info = ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=port,
                       addresses=[socket.inet_aton("127.0.0.1")], properties=fields,
                       server=f"{name}.local.")
    zc.register_service(info, cooperating_responders=True)
    return info


def test_an_announced_stage_is_found_with_its_fields_and_its_token_checked(cluster: str):
    memory = [123 << 20]
    announcer = Announcer("127.0.0.1:7790", 7790, cluster=cluster, token=TOKEN, wide=True, device="cpu",
                          memory_free=lambda: memory[0]).start()
    try:
        found = browse(LOOPBACK, 5.0, lambda ad: ad.cluster == cluster)
        memory[0] = 77 << 20
        announcer.refresh()
        refreshed = browse(LOOPBACK, 5.0, lambda ad: ad.cluster == cluster)
    finally:
        announcer.close()
    ad = next(ad for ad in found if ad.cluster == cluster)
    assert (ad.endpoint, ad.version, ad.device, ad.memory_free_bytes) == \
        ("127.0.0.1:7790", PROTOCOL_VERSION, "cpu", 123 << 20)
    assert next(ad for ad in refreshed if ad.cluster == cluster).memory_free_bytes == 77 << 20
    assert TOKEN not in ad.fingerprint
    check_usable(ad, cluster, TOKEN)
    for other_cluster, token in ((cluster, "another-token"), (cluster, None), ("elsewhere", TOKEN)):
        with pytest.raises(DiscoveryError):
            check_usable(ad, other_cluster, token)


@pytest.mark.slow
def test_forged_foreign_oversized_and_misdirected_advertisements_are_ignored(
        cluster: str, zeroconf: Zeroconf, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    stage = start_stage_server("127.0.0.1:0", tmp_path, never_loads, auth_token=TOKEN)
    port = int(stage.node.endpoint.rpartition(":")[2])
    not_layerline = socket.create_server(("127.0.0.1", 0))
    other_port = not_layerline.getsockname()[1]
    base = {"v": PROTOCOL_VERSION, "mem": "1", "dev": "cpu"}
    try:
        # A real stage's fingerprint, copied into an advertisement of another port.
        copied = token_fingerprint(TOKEN, cluster, ["127.0.0.1"], port)
        forge(zeroconf, other_port, cluster=cluster, fp=copied, **base)
        forge(zeroconf, port, cluster="another-cluster", fp=token_fingerprint(TOKEN, "another-cluster",
                                                                              ["127.0.0.1"], port), **base)
        forge(zeroconf, port, cluster=cluster, fp=token_fingerprint("another-token", cluster, ["127.0.0.1"],
                                                                    port), **base)
        forge(zeroconf, port, cluster=cluster, fp=token_fingerprint(TOKEN, cluster, ["127.0.0.1"], port),
              **{f"pad{i}": "x" * 200 for i in range(10)}, **base)
        # A well-formed advertisement of our cluster and token, at a port no stage answers on.
        forge(zeroconf, other_port, cluster=cluster,
              fp=token_fingerprint(TOKEN, cluster, ["127.0.0.1"], other_port), **base)
        with caplog.at_level(logging.WARNING, logger="layerline.discovery"):
            found = find_peers(cluster, TOKEN, LOOPBACK, 3.0)
        assert found == []
        reasons = "\n".join(r.getMessage() for r in caplog.records if "discovery_ignored" in r.getMessage())
        assert "not ours" in reasons  # the copied fingerprint, and the other token's
        assert "TXT record is" in reasons
        assert "is of cluster 'another-cluster'" in reasons
        assert "no layerline stage answers there" in reasons
        assert stage.node.claims.holder is None
    finally:
        not_layerline.close()
        stage.stop(0)


def test_a_free_stage_of_the_cluster_is_found_and_a_claimed_one_is_not(cluster: str, tmp_path: Path):
    stage = start_stage_server("127.0.0.1:0", tmp_path, never_loads, auth_token=TOKEN)
    endpoint = stage.node.endpoint
    port = int(endpoint.rpartition(":")[2])
    announcer = Announcer(endpoint, port, cluster=cluster, token=TOKEN, wide=True, device="cpu",
                          memory_free=lambda: 1).start()
    try:
        assert find_peers(cluster, TOKEN, LOOPBACK, 5.0, want=1) == [endpoint]
        stage.node.claims.claim("coord-other", 1, "run-other", "some/model", "", 60)
        assert find_peers(cluster, TOKEN, LOOPBACK, 1.5) == []
    finally:
        announcer.close()
        stage.stop(0)
