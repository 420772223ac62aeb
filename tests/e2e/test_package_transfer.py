"""Layers reach every stage: fetched from stage 0 when a peer cannot read the package, resumed after
a broken link, fetched again when damaged in flight, kept by content so a restart hashes nothing."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import huggingface_hub
import pytest

from layerline.packager.manifest import MANIFEST_NAME
from layerline.packager.package import LayerPackage, sha256_file
from layerline.proto import stage_control_pb2 as pb
from layerline.proto import stage_control_pb2_grpc as pb_grpc
from layerline.runtime.bench.processes import free_port
from layerline.runtime.stage.content_cache import ContentCache
from layerline.runtime.stage.prepare import Preparation, PrepareState, range_files

from helpers import FaultyLink, Stage0Process, StageProcess, greedy_reference

NOT_HERE = "/nonexistent/tiny-llama"  # a package path no stage of these tests can read


@pytest.fixture(scope="module")
def file_server(tiny_llama_package: Path, tmp_path_factory: pytest.TempPathFactory):
    """Stage 0 alone over the tiny package: its PackageFiles endpoint."""
    root = tmp_path_factory.mktemp("file-server")
    listen = f"127.0.0.1:{free_port()}"
    stage0 = Stage0Process(tiny_llama_package, [], root, "--listen", listen)
    yield listen
    stage0.stop()


def manifest_sha(package: Path) -> str:
    return sha256_file(package / MANIFEST_NAME)


def stage0_files_bytes(package: Path) -> int:
    opened = LayerPackage.open(package)
    return sum(opened.manifest.file(f).bytes for f in range_files(opened, 0, 1, stage0=True))


def prepare_from(sources: list[str], package: Path, cache: Path, ref: str = NOT_HERE):
    """Stage 0's files of layer 0 (the embedding is the largest file), fetched from `sources`."""
    return Preparation(ref, 0, 1, stage0=True, cache_dir=cache, manifest_sha256=manifest_sha(package),
                       file_sources=sources).start().wait(120)


def broken_off_preparation(link_to: str, package: Path, cache: Path) -> tuple[Preparation, FaultyLink]:
    """A preparation whose link stalls 3 MB in (inside the embedding), and breaks for good once some of
    the embedding is on disk: gRPC drops what it received but the client had not yet read."""
    link = FaultyLink(link_to, stall_after=3_000_000, refuse_after_cut=True)
    preparation = Preparation(NOT_HERE, 0, 1, stage0=True, cache_dir=cache,
                              manifest_sha256=manifest_sha(package), file_sources=[link.endpoint]).start()
    embed = LayerPackage.open(package).manifest.file("shared/embed.safetensors")
    partial = ContentCache(cache).partial(embed.sha256)
    deadline = time.monotonic() + 60
    while not (partial.is_file() and partial.stat().st_size > 0):
        assert time.monotonic() < deadline, "no byte of the embedding arrived"
        time.sleep(0.05)
    link.cut()
    return preparation.wait(120), link


def test_peer_without_the_package_serves_from_files_fetched_from_stage0(tiny_llama_package, tmp_path):
    # Stage 0 is given a relative path: the peer, started elsewhere, cannot read the package.
    peer_cache = tmp_path / "peer"
    peer = StageProcess((), peer_cache)
    try:
        stage0 = Stage0Process(Path(tiny_llama_package.name), [peer.endpoint], tmp_path / "stage0",
                               "--split", "0:2,2:4", cwd=tiny_llama_package.parent)
        try:
            prompt = "The capital of France is"
            expected = greedy_reference(tiny_llama_package, prompt, 12)
            model = stage0.status()["model"]
            answer = stage0.client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                                      temperature=0)
            assert answer.choices[0].text == expected
            stage = stage0.status()["stages"][1]
            package = LayerPackage.open(tiny_llama_package)
            range_bytes = sum(package.manifest.file(f).bytes for f in package.manifest.layer_files(2, 4))
            [(source, fetched)] = stage["sources"].items()
            manifest_bytes = (tiny_llama_package / MANIFEST_NAME).stat().st_size
            assert source.startswith("stage 127.0.0.1:") and fetched == range_bytes + manifest_bytes
            cached = {p.name for p in (peer_cache / "blobs").iterdir()}
            wanted = {package.manifest.file(f).sha256 for f in package.manifest.layer_files(2, 4)}
            assert wanted <= cached and len(cached - wanted) <= 1  # the range's layers (and the manifest)

            # A restarted peer with its cache is repaired without fetching or hashing anything.
            peer.kill()
            peer = StageProcess((), peer_cache, port=peer.port)
            deadline = time.monotonic() + 60
            while (stage := stage0.status()["stages"][1])["state"] != "ready" or \
                    "cache" not in stage["sources"]:
                assert time.monotonic() < deadline, stage
                time.sleep(0.2)
            assert stage["sources"] == {"cache": range_bytes}
            again = stage0.client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
            assert again.choices[0].text == expected
        finally:
            stage0.stop()
    finally:
        peer.stop()


@pytest.mark.slow
def test_status_shows_each_stage_fetching_before_the_pipeline_is_up(tiny_llama_package, tmp_path):
    peer = StageProcess((), tmp_path / "peer")
    # 0.05 MB/s: the range's ~0.3 MB take six seconds, long enough to watch.
    stage0 = Stage0Process(Path(tiny_llama_package.name), [peer.endpoint], tmp_path / "stage0", "--split",
                           "0:2,2:4", "--file-rate-limit", "0.05", cwd=tiny_llama_package.parent, wait=False)
    try:
        seen = None
        deadline = time.monotonic() + 60
        while seen is None:
            assert time.monotonic() < deadline
            try:
                stage = stage0.status()["stages"][1]
            except httpx.TransportError:
                continue  # HTTP not up yet
            if stage["state"] == "preparing" and stage["bytes_per_s"] and stage["eta_s"]:
                seen = stage
                assert httpx.get(f"{stage0.url}/health").status_code == 503
                refused = httpx.post(f"{stage0.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_loading"
            time.sleep(0.1)
        assert 0 < seen["bytes_present"] < seen["bytes_total"]
        stage0.wait_healthy()
        assert stage0.status()["stages"][1]["state"] == "ready"
    finally:
        stage0.stop()
        peer.stop()


@pytest.mark.slow
def test_a_broken_transfer_resumes_where_it_stopped(file_server, tiny_llama_package, tmp_path):
    total = stage0_files_bytes(tiny_llama_package) + (tiny_llama_package / MANIFEST_NAME).stat().st_size
    first, link = broken_off_preparation(file_server, tiny_llama_package, tmp_path)
    assert first.state is PrepareState.FAILED
    assert "shared/embed.safetensors" in first.error and "broke off" in first.error
    partial = ContentCache(tmp_path).partial(
        LayerPackage.open(tiny_llama_package).manifest.file("shared/embed.safetensors").sha256)
    assert partial.stat().st_size > 0

    # Stage 0 comes back (here: the same server, reached directly): the rest, and only the rest.
    second = prepare_from([file_server], tiny_llama_package, tmp_path)
    assert second.state is PrepareState.READY, second.error
    sent = first.sources[f"stage {link.endpoint}"][0] + second.sources[f"stage {file_server}"][0]
    assert sent == total
    assert second.files["shared/embed.safetensors"] == f"stage {file_server}"


def test_a_link_that_drops_once_is_resumed_within_the_preparation(file_server, tiny_llama_package, tmp_path):
    link = FaultyLink(file_server, cut_after=2_000_000)
    report = prepare_from([link.endpoint], tiny_llama_package, tmp_path)
    assert report.state is PrepareState.READY, report.error
    total = stage0_files_bytes(tiny_llama_package) + (tiny_llama_package / MANIFEST_NAME).stat().st_size
    assert report.sources[f"stage {link.endpoint}"][0] == total  # no byte twice


def test_a_chunk_damaged_in_flight_is_caught_and_the_file_fetched_again(file_server, tiny_llama_package,
                                                                        tmp_path):
    link = FaultyLink(file_server, corrupt_frames=1)
    report = prepare_from([link.endpoint], tiny_llama_package, tmp_path)
    assert report.state is PrepareState.READY, report.error
    assert link.corrupted == 1
    total = stage0_files_bytes(tiny_llama_package) + (tiny_llama_package / MANIFEST_NAME).stat().st_size
    assert report.sources[f"stage {link.endpoint}"][0] > total  # the damaged file came twice
    package = LayerPackage.open(tiny_llama_package)
    for name in report.files:
        assert sha256_file(ContentCache(tmp_path).blob(package.manifest.file(name).sha256)) == \
            package.manifest.file(name).sha256


def test_a_source_that_keeps_damaging_a_file_fails_naming_it(file_server, tiny_llama_package, tmp_path):
    link = FaultyLink(file_server, corrupt_frames=10**6)
    report = prepare_from([link.endpoint], tiny_llama_package, tmp_path)
    assert report.state is PrepareState.FAILED
    assert "failed verification (sha256 mismatch)" in report.error
    assert report.error.startswith("cannot prepare layers/00000.safetensors: stage 127.0.0.1:")


@pytest.mark.slow
def test_stage0_releases_a_peer_that_cannot_get_its_files(tiny_llama_package, file_server, tmp_path):
    link = FaultyLink(file_server, corrupt_frames=10**6)
    peer = StageProcess((), tmp_path / "peer")
    try:
        with pytest.raises(Exception) as failed:
            Stage0Process(Path(tiny_llama_package.name), [peer.endpoint], tmp_path / "stage0",
                          "--split", "0:2,2:4", "--advertise", link.endpoint, cwd=tiny_llama_package.parent)
        assert "stage 1" in str(failed.value) and "failed verification" in str(failed.value)
        channel = grpc.insecure_channel(peer.endpoint)
        status = pb_grpc.StageControlStub(channel).Control(pb.StageControlRequest(status=pb.StatusRequest()))
        assert status.status.state == pb.STAGE_STATE_FREE  # released
        channel.close()
    finally:
        peer.stop()


def test_a_warm_cache_is_ready_without_hashing(file_server, tiny_llama_package, tmp_path):
    first = prepare_from([file_server], tiny_llama_package, tmp_path)
    assert first.state is PrepareState.READY and first.bytes_hashed == 0  # hashed as it arrived
    second = prepare_from([file_server], tiny_llama_package, tmp_path)
    assert second.state is PrepareState.READY
    assert second.bytes_hashed == 0 and set(second.sources) == {"cache"}

    def prepare_locally():
        prep = Preparation(str(tiny_llama_package), 0, 2, stage0=False, cache_dir=tmp_path / "local")
        return prep.start().wait(60)

    local = prepare_locally()
    assert local.bytes_hashed == local.bytes_total > 0
    again = prepare_locally()
    assert again.state is PrepareState.READY and again.bytes_hashed == 0 and set(again.sources) == {"local"}


def test_hub_unreachable_falls_back_to_stage0(file_server, tiny_llama_package, tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    report = prepare_from([file_server], tiny_llama_package, tmp_path, ref="acme/tiny-layers")
    assert report.state is PrepareState.READY, report.error
    assert set(report.sources) == {f"stage {file_server}"}


def test_fetch_refuses_files_it_does_not_hold(file_server):
    stub = pb_grpc.PackageFilesStub(grpc.insecure_channel(file_server))
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Fetch(pb.FetchRequest(manifest_sha256="0" * 64, path="../../etc/passwd", sha256="1" * 64)))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Fetch(pb.FetchRequest(manifest_sha256="x", path=MANIFEST_NAME, sha256="y")))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_fetch_needs_the_stage_token(tmp_path, tiny_llama_package):
    (tmp_path / "token").write_text("s3cret\n")
    stage = StageProcess(("--auth-token-file", str(tmp_path / "token")), tmp_path / "stage")
    try:
        stub = pb_grpc.PackageFilesStub(grpc.insecure_channel(stage.endpoint))
        sha = manifest_sha(tiny_llama_package)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Fetch(pb.FetchRequest(manifest_sha256=sha, path=MANIFEST_NAME, sha256=sha)))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stage.stop()


def test_cache_prune_keeps_what_packages_use(file_server, tiny_llama_package, tmp_path):
    assert broken_off_preparation(file_server, tiny_llama_package, tmp_path)[0].state is PrepareState.FAILED
    Preparation(NOT_HERE, 2, 4, stage0=False, cache_dir=tmp_path,
                manifest_sha256=manifest_sha(tiny_llama_package), file_sources=[file_server]).start().wait(60)
    listed = subprocess.run([sys.executable, "-m", "layerline", "stage", "cache", "list", "--cache-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and manifest_sha(tiny_llama_package)[:16] in listed.stdout
    cache = ContentCache(tmp_path)
    before = cache.summary()
    assert before.partial_bytes > 0 and len(before.packages) == 1 and before.packages[0].files == 2
    freed = cache.prune()
    after = cache.summary()
    assert freed >= before.partial_bytes and after.partial_bytes == 0 and after.unused_blobs == 0
    assert after.packages == before.packages
    cache.prune(["all"])
    assert cache.summary().blobs == 0
