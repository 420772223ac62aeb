"""Prepare: materialize and verify the files of one layer range, in the background.

A package reference is a local folder or a Hub repo id (`org/name[@revision]`).
Only the files the range needs are fetched (Hub: `allow_patterns`), and each is
checked against its sha256 before the stage reports it present.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from layerline.errors import LayerlineError, ManifestError
from layerline.packager.manifest import MANIFEST_NAME
from layerline.packager.package import LayerPackage, sha256_file
from layerline.packager.source import is_hub_id


class PrepareState(Enum):
    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class InventoryReport:
    state: PrepareState
    bytes_present: int
    bytes_total: int
    layers_ready: int
    error: str = ""


def range_files(package: LayerPackage, start: int, end: int, stage0: bool) -> list[str]:
    """The package files a stage running layers [start, end) needs."""
    files = package.manifest.layer_files(start, end)
    return files + package.stage0_files() if stage0 else files


def fetch_manifest(ref: str, cache_dir: Path) -> Path:
    """The local root holding `ref`'s manifest: the package folder itself, or a Hub download.

    A ref that is neither says so in the same words whether or not such a path exists here:
    a coordinator learns nothing of this machine's files from the error.
    """
    local = Path(ref).expanduser()
    if (local / MANIFEST_NAME).is_file():
        return local
    if not is_hub_id(ref):
        raise LayerlineError(f"package {ref} is not a layer package folder on this machine, nor a Hub "
                             "repo id", hint="pass the package folder path, or a Hub repo id (org/name)")
    from huggingface_hub import snapshot_download

    repo_id, _, revision = ref.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=[MANIFEST_NAME], cache_dir=cache_dir))
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "cannot fetch"
        raise LayerlineError(
            f"package {ref} could not be fetched from the Hub: {exc}",
            hint="check the repo id and this machine's network, or give a local package folder",
        ) from exc


def local_layer_count(ref: str) -> int | None:
    """How many layers the package at `ref` has, if `ref` is a readable local package; else None."""
    local = Path(ref).expanduser()
    if not (local / MANIFEST_NAME).is_file():
        return None
    try:
        return LayerPackage.open(local).manifest.num_layers
    except LayerlineError:
        return None  # Prepare itself reports what is wrong with it


class Preparation:
    """One Prepare request's background work and its inventory."""

    def __init__(self, ref: str, start: int, end: int, *, stage0: bool, cache_dir: Path,
                 manifest_sha256: str | None = None) -> None:
        self.ref, self.layer_start, self.layer_end, self.stage0 = ref, start, end, stage0
        self.cache_dir = cache_dir
        self.manifest_sha256 = manifest_sha256
        self._lock = threading.Lock()
        self._state = PrepareState.PREPARING
        self._present = 0
        self._total = 0
        self._layers_ready = 0
        self._error = ""
        self.package: LayerPackage | None = None
        self._thread = threading.Thread(target=self._run, name=f"prepare-{start}-{end}", daemon=True)

    def start(self) -> Preparation:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> InventoryReport:
        self._thread.join(timeout)
        return self.inventory()

    def inventory(self) -> InventoryReport:
        with self._lock:
            return InventoryReport(self._state, self._present, self._total, self._layers_ready,
                                   self._error)

    def _advance(self, n: int) -> None:
        with self._lock:
            self._present += n

    def _run(self) -> None:
        try:
            self._prepare()
        except Exception as exc:  # reported through Inventory, never raised into gRPC threads
            with self._lock:
                self._state = PrepareState.FAILED
                self._error = str(exc)

    def _prepare(self) -> None:
        root = fetch_manifest(self.ref, self.cache_dir)
        if self.manifest_sha256:
            actual = sha256_file(root / MANIFEST_NAME)
            if actual != self.manifest_sha256:
                raise ManifestError(
                    f"package {self.ref} on this stage has manifest sha256 {actual}, but the "
                    f"coordinator's is {self.manifest_sha256}",
                    hint="give every stage the same package version",
                )
        package = LayerPackage.open(root)
        files = range_files(package, self.layer_start, self.layer_end, self.stage0)
        with self._lock:
            self._total = sum(package.manifest.file(f).bytes for f in files)
        if not all(package.path(f).is_file() for f in files):
            root = self._download(files)
            package = LayerPackage.open(root)
        layer_files = set(package.manifest.layer_files(self.layer_start, self.layer_end))
        for rel in files:
            package.verify([rel], on_bytes=self._advance)
            if rel in layer_files:
                with self._lock:
                    self._layers_ready += 1
        with self._lock:
            self.package = package
            self._state = PrepareState.READY

    def _download(self, files: list[str]) -> Path:
        from huggingface_hub import snapshot_download

        repo_id, _, revision = self.ref.partition("@")
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=[MANIFEST_NAME, *files],
                                      cache_dir=self.cache_dir))
