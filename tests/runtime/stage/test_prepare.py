"""Prepare / Inventory: only a range's files are materialized and verified."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub

from layerline.packager.manifest import MANIFEST_NAME
from layerline.packager.package import sha256_file
from layerline.runtime.stage.prepare import Preparation, PrepareState


def test_local_range_is_verified_and_reported_ready(tiny_llama_package, tmp_path):
    prep = Preparation(str(tiny_llama_package), 1, 3, stage0=False, cache_dir=tmp_path,
                       manifest_sha256=sha256_file(tiny_llama_package / MANIFEST_NAME)).start()
    report = prep.wait(timeout=60)
    assert report.state is PrepareState.READY, report.error
    assert report.layers_ready == 2
    expected = sum((tiny_llama_package / f"layers/0000{i}.safetensors").stat().st_size for i in (1, 2))
    assert report.bytes_present == report.bytes_total == expected


def test_stage0_range_includes_embedding_head_and_tokenizer(tiny_llama_package, tmp_path):
    report = Preparation(str(tiny_llama_package), 0, 1, stage0=True, cache_dir=tmp_path).start().wait(60)
    assert report.state is PrepareState.READY
    assert report.bytes_total > (tiny_llama_package / "shared/embed.safetensors").stat().st_size


def test_tampered_layer_fails_prepare_naming_the_file(tiny_llama_package, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_package, copy)
    with open(copy / "layers/00002.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    report = Preparation(str(copy), 2, 4, stage0=False, cache_dir=tmp_path).start().wait(60)
    assert report.state is PrepareState.FAILED
    assert "layers/00002.safetensors (sha256 mismatch)" in report.error


def test_other_package_version_is_refused(tiny_llama_package, tmp_path):
    report = Preparation(str(tiny_llama_package), 0, 2, stage0=False, cache_dir=tmp_path,
                         manifest_sha256="f" * 64).start().wait(60)
    assert report.state is PrepareState.FAILED
    assert "same package version" in report.error or "coordinator's is ffff" in report.error


def test_hub_package_downloads_only_the_ranges_files(tiny_llama_package, tmp_path, monkeypatch):
    calls = []

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, local_dir=None):
        # Behaves like the Hub: one file, into the local folder (or a snapshot of the cache).
        calls.append((repo_id, revision, filename))
        target = Path(local_dir or cache_dir / "snapshot") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_llama_package / filename, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    report = Preparation("acme/tiny-layers@v1", 2, 4, stage0=False, cache_dir=tmp_path).start().wait(60)
    assert report.state is PrepareState.READY, report.error
    assert calls == [("acme/tiny-layers", "v1", name) for name in
                     (MANIFEST_NAME, "layers/00002.safetensors", "layers/00003.safetensors")]
    assert set(report.sources) == {"hub"} and report.files["layers/00002.safetensors"] == "hub"

    # Prepared again: from the content cache, nothing downloaded or hashed.
    calls.clear()
    again = Preparation("acme/tiny-layers@v1", 2, 4, stage0=False, cache_dir=tmp_path).start().wait(60)
    assert again.state is PrepareState.READY and set(again.sources) == {"cache"}
    assert again.bytes_hashed == 0 and calls == [("acme/tiny-layers", "v1", MANIFEST_NAME)]
