"""The lease keeper renews a real stage server's claim on a thread of its own, whatever another
peer does, and stops renewing when told."""

from __future__ import annotations

import time
from pathlib import Path

from layerline.proto import stage_control_pb2 as pb
from layerline.runtime.bench.processes import free_port
from layerline.runtime.stage.client import StageClient
from layerline.runtime.stage.server import start_stage_server
from layerline.runtime.stage0.lease_keeper import LeaseKeeper

LEASE_S = 0.6
TERM = int(time.time() * 1000)


def never_loads(package, options):
    raise AssertionError("this test loads no model")


def client_for(endpoint: str) -> StageClient:
    return StageClient(endpoint, coordinator_id="coord-lease-test", term=TERM,
                       run_id="run-lease-test", timeout_s=2.0)


def test_leases_stay_renewed_beside_an_unreachable_peer_and_lapse_once_stopped(tmp_path: Path):
    server = start_stage_server("127.0.0.1:0", tmp_path, never_loads)
    endpoint = server.node.endpoint
    claimant = client_for(endpoint)
    try:
        claimant.call(claim=pb.Claim(package=pb.PackageIdentity(ref="some/model"),
                                     lease_duration_ms=int(LEASE_S * 1000)))
        keeper = LeaseKeeper(LEASE_S, client_for)
        keeper.keep(endpoint)
        keeper.keep(f"127.0.0.1:{free_port()}")  # nothing listens there: its renewals fail
        time.sleep(LEASE_S * 4)
        assert server.node.claims.holder is not None
        record = keeper.records[endpoint]
        assert record.renewals >= 4 and record.failures == 0, record
        keeper.stop()
        time.sleep(LEASE_S * 1.5)
        assert server.node.claims.holder is None
    finally:
        claimant.close()
        server.stop(0)
