"""Names that become paths (issue 25, item 1): a sha256 from a Claim, a manifest or a Fetch is
64 lowercase hex digits or refused, the content cache never writes outside its root, and a
Release stops a preparation under way."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from layerline.errors import LayerlineError, ManifestError
from layerline.packager.manifest import MANIFEST_NAME, read_manifest
from layerline.packager.package import sha256_file
from layerline.proto import stage_control_pb2 as pb
from layerline.runtime.bench.processes import free_port
from layerline.runtime.stage.client import StageClient, StageRejectedError
from layerline.runtime.stage.content_cache import ContentCache
from layerline.runtime.stage.prepare import Preparation, PrepareState

from helpers import FaultyLink, Stage0Process

FORGED = ["../../../victim", "", "A" * 64, "0" * 63, "0" * 64 + "/x", "..", "0" * 64 + "\n"]


def test_a_claim_whose_manifest_sha256_is_a_path_is_refused_and_touches_no_file(
        stage_processes, tiny_llama_package, tmp_path):
    stage = stage_processes()
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    coordinator = StageClient(stage.endpoint, coordinator_id="attacker", term=1, run_id="run-a")
    # From <cache>/locks/ or <cache>/blobs/, three levels up is tmp_path.
    claim = pb.Claim(package=pb.PackageIdentity(ref=str(tiny_llama_package),
                                                manifest_sha256="../../../victim"),
                     lease_duration_ms=30_000)
    with pytest.raises(StageRejectedError) as caught:
        coordinator.call(claim=claim)
    assert caught.value.rejected.reason == pb.REJECT_REASON_BAD_REQUEST
    assert "64 lowercase hex digits" in caught.value.rejected.message
    assert victim.read_text() == "keep me"
    assert not list(tmp_path.glob("victim.*"))
    assert coordinator.status().state == pb.STAGE_STATE_FREE


@pytest.mark.parametrize("forged", FORGED)
def test_the_content_cache_names_no_file_by_anything_but_a_sha256(tmp_path, forged):
    cache = ContentCache(tmp_path / "cache")
    for name in (cache.blob, cache.partial, cache.lock, cache.package_root):
        with pytest.raises(LayerlineError, match="is not a sha256"):
            name(forged)
    assert cache.blob("0" * 64) == tmp_path / "cache" / "blobs" / ("0" * 64)


def test_the_content_cache_refuses_a_folder_linked_outside_it(tmp_path):
    cache = ContentCache(tmp_path / "cache")
    (tmp_path / "elsewhere").mkdir()
    cache.root.mkdir()
    (cache.root / "blobs").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LayerlineError, match="resolves outside the stage cache"):
        cache.partial("0" * 64)


def test_a_manifest_whose_file_sha256_is_a_path_does_not_open(tiny_llama_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_llama_package, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["files"][3]["sha256"] = "../../../../victim"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"files\[3\]\.sha256.*64 lowercase hex digits"):
        read_manifest(copy)


def test_a_cancelled_preparation_fails_and_writes_no_package_view(tiny_llama_package, tmp_path):
    preparation = Preparation(str(tiny_llama_package), 0, 4, stage0=True, cache_dir=tmp_path / "cache",
                              manifest_sha256=sha256_file(tiny_llama_package / MANIFEST_NAME))
    preparation.cancel()
    report = preparation.start().wait(60)
    assert report.state is PrepareState.FAILED
    assert "cancelled" in report.error
    assert not (tmp_path / "cache" / "packages").exists()


def test_a_release_stops_the_preparation_under_way(stage_processes, tiny_llama_package):
    stage = stage_processes()
    coordinator = StageClient(stage.endpoint, coordinator_id="coord", term=1, run_id="run-a")
    coordinator.call(claim=pb.Claim(package=pb.PackageIdentity(ref=str(tiny_llama_package)),
                                    lease_duration_ms=30_000))
    coordinator.call(prepare=pb.Prepare(layers=pb.LayerRange(start=0, end=4)))
    coordinator.call(release=pb.Release())
    status = coordinator.status()
    assert status.state == pb.STAGE_STATE_FREE
    # Claimed again, the stage has nothing prepared: the released run's work is gone.
    coordinator = StageClient(stage.endpoint, coordinator_id="coord", term=2, run_id="run-b")
    coordinator.call(claim=pb.Claim(package=pb.PackageIdentity(ref=str(tiny_llama_package)),
                                    lease_duration_ms=30_000))
    answer = coordinator.call(inventory=pb.InventoryRequest()).inventory
    assert answer.state == pb.INVENTORY_STATE_FAILED and "send Prepare" in answer.error


def _cache_files(cache: Path) -> dict[str, int]:
    """Every file the stage wrote to its cache (not its logs), with its size."""
    return {str(path.relative_to(cache)): path.stat().st_size for path in cache.rglob("*")
            if path.is_file() and path.suffix != ".log"}


@pytest.mark.slow
def test_a_release_stops_a_slow_transfer_in_the_middle(stage_processes, tiny_llama_package, tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    (tmp_path / "source").mkdir()
    source = Stage0Process(tiny_llama_package, [], tmp_path / "source", "--listen", listen)
    slow = FaultyLink(listen, bytes_per_s=2_000_000)  # the 25 MB embedding would take ~12 s
    try:
        stage = stage_processes()
        cache = tmp_path / "stage-cache"
        coordinator = StageClient(stage.endpoint, coordinator_id="coord", term=1, run_id="run-a")
        coordinator.call(claim=pb.Claim(package=pb.PackageIdentity(
            ref="/nonexistent/tiny-llama", manifest_sha256=sha256_file(tiny_llama_package / MANIFEST_NAME)),
            lease_duration_ms=30_000))
        coordinator.call(prepare=pb.Prepare(layers=pb.LayerRange(start=0, end=1), include_stage0_files=True,
                                            file_sources=[slow.endpoint]))
        deadline = time.monotonic() + 30
        while not any(name.endswith(".partial") and size > 0 for name, size in _cache_files(cache).items()):
            assert time.monotonic() < deadline, _cache_files(cache)
            time.sleep(0.1)
        time.sleep(0.5)  # in the middle of the embedding
        coordinator.call(release=pb.Release())
        time.sleep(0.5)  # what was in flight when it answered
        after_release = _cache_files(cache)
        time.sleep(2)  # ~4 MB more at the link's pace, were it still fetching
        assert _cache_files(cache) == after_release
        assert sum(after_release.values()) < 20_000_000, after_release  # stopped in the middle
        assert coordinator.status().state == pb.STAGE_STATE_FREE
    finally:
        slow.close()
        source.stop()
