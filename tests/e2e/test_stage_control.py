"""The control protocol against real `layerline stage serve` processes on loopback."""

from __future__ import annotations

import shutil

import pytest

from layerline.errors import StageLoadError, StageUnavailableError
from layerline.packager.build import BuildOptions, build_package
from layerline.packager.package import LayerPackage
from layerline.proto import activation_pb2 as act_pb
from layerline.proto import stage_control_pb2 as pb
from layerline.runtime.stage.client import ActivationAddress, StageClient, StageRejectedError
from layerline.runtime.stage.frame_budget import FrameBudget
from layerline.runtime.stage.frame_transport import ConnectionRefusedByStage, FrameConnection
from layerline.runtime.stage0.coordinator import Coordinator, CoordinatorOptions


def claim(client: StageClient, ref: str = "pkg") -> pb.StageControlResponse:
    return client.call(claim=pb.Claim(package=pb.PackageIdentity(ref=ref), lease_duration_ms=30_000))


def client(endpoint: str, who: str, term: int, token: str | None = None) -> StageClient:
    return StageClient(endpoint, coordinator_id=who, term=term, run_id=f"run-{who}", token=token)


def test_lower_term_is_rejected_and_higher_term_takes_over(stage_process):
    endpoint = stage_process()
    first, second = client(endpoint, "coord-a", 5), client(endpoint, "coord-b", 3)
    assert claim(first).WhichOneof("response") == "claim_accepted"
    with pytest.raises(StageRejectedError) as caught:
        claim(second)
    assert caught.value.rejected.reason == pb.REJECT_REASON_STALE_TERM
    assert (caught.value.rejected.holder_coordinator_id, caught.value.rejected.holder_term) == ("coord-a", 5)

    third = client(endpoint, "coord-c", 9)
    accepted = claim(third).claim_accepted
    assert accepted.preempted_coordinator_id == "coord-a"
    with pytest.raises(StageRejectedError) as caught:
        first.call(inventory=pb.InventoryRequest())
    assert caught.value.rejected.holder_term == 9
    status = third.status()
    assert (status.holder_coordinator_id, status.holder_term) == ("coord-c", 9)


def test_requests_without_a_claim_are_rejected(stage_process):
    endpoint = stage_process()
    with pytest.raises(StageRejectedError) as caught:
        client(endpoint, "coord-a", 1).call(prepare=pb.Prepare(layers=pb.LayerRange(start=0, end=1)))
    assert caught.value.rejected.reason == pb.REJECT_REASON_NOT_CLAIMED


def test_calls_without_the_token_are_refused(stage_process, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    endpoint = stage_process("--auth-token-file", str(token_file))
    with pytest.raises(StageUnavailableError, match="UNAUTHENTICATED"):
        client(endpoint, "coord-a", 1).status()
    with pytest.raises(StageUnavailableError, match="UNAUTHENTICATED"):
        client(endpoint, "coord-a", 1, token="wrong").status()
    assert client(endpoint, "coord-a", 1, token="s3cret").status().healthy

    address = ActivationAddress(endpoint, "s3cret").get()
    with pytest.raises(ConnectionRefusedByStage) as caught:
        FrameConnection(address, budget=FrameBudget(10.0), token="wrong")
    assert caught.value.code == act_pb.ACTIVATION_ERROR_CODE_UNAUTHENTICATED
    # The stage keeps serving after refusing.
    assert client(endpoint, "coord-a", 1, token="s3cret").status().healthy


def test_tampered_package_fails_bring_up_releases_every_stage_and_names_it(stage_process, tiny_llama,
                                                                           tmp_path):
    package_dir = tmp_path / "tiny"
    build_package(str(tiny_llama["folder"]), package_dir, BuildOptions(quiet=True))
    tampered = tmp_path / "tampered"
    shutil.copytree(package_dir, tampered)
    with open(tampered / "layers/00003.safetensors", "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    peers = [stage_process(), stage_process()]
    coordinator = Coordinator(LayerPackage.open(tampered), CoordinatorOptions(
        package_ref=str(tampered), peers=peers, split=[(0, 1), (1, 3), (3, 4)]))
    with pytest.raises(StageLoadError) as caught:
        coordinator.bring_up()
    message = caught.value.message
    assert f"stage 2 ({peers[1]}, layers 3..4) failed to prepare" in message
    assert "layers/00003.safetensors (sha256 mismatch)" in message
    for endpoint in peers:
        status = client(endpoint, "observer", 0).status()
        assert status.holder_coordinator_id == ""  # released
        assert status.state == pb.STAGE_STATE_FREE
