"""Prepare: materialize and verify the files of one layer range, in the background.

Each file comes from the first source that has it, in this order:

1. the package folder on this machine (`ref` is a path here),
2. this stage's content cache (a file of any package or revision, kept by sha256),
3. the Hugging Face Hub (`ref` is a repo id): that file alone, resumable,
4. the stages named in Prepare (stage 0 first), over PackageFiles.Fetch, resumable.

Every file is checked against its sha256 before the stage reports it present, except
one whose size and mtime match this stage's record of an earlier check: so a restart
with an unchanged cache is ready without hashing anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from layerline.errors import ChecksumError, LayerlineError, ManifestError
from layerline.packager.manifest import MANIFEST_NAME, FileEntry
from layerline.packager.package import LayerPackage, sha256_file
from layerline.packager.source import is_hub_id

from .content_cache import ContentCache
from .file_fetch import FileSource, WantedFile, fetch_from
from .file_service import FileIndex

log = logging.getLogger("layerline.stage")

LOCAL, CACHE, HUB = "local", "cache", "hub"


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
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)  # source → (bytes, files)
    bytes_hashed: int = 0
    files: dict[str, str] = field(default_factory=dict)  # package path → its source


def range_files(package: LayerPackage, start: int, end: int, stage0: bool) -> list[str]:
    """The package files a stage running layers [start, end) needs."""
    files = package.manifest.layer_files(start, end)
    return files + package.stage0_files() if stage0 else files


def split_hub_ref(ref: str) -> tuple[str, str | None]:
    """`org/name[@revision]` → (repo id, revision or None)."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


def neither_folder_nor_hub(ref: str) -> str:
    return f"package {ref} is not a layer package folder on this machine, nor a Hub repo id"


def fetch_manifest(ref: str, cache_dir: Path) -> Path:
    """The local root holding `ref`'s manifest: the package folder itself, or a Hub download.

    A ref that is neither says so in the same words whether or not such a path exists here:
    a coordinator learns nothing of this machine's files from the error.
    """
    local = Path(ref).expanduser()
    if (local / MANIFEST_NAME).is_file():
        return local
    if not is_hub_id(ref):
        raise LayerlineError(neither_folder_nor_hub(ref),
                             hint="pass the package folder path, or a Hub repo id (org/name)")
    return _hub_manifest(ref, cache_dir).parent


def _hub_manifest(ref: str, cache_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    repo_id, revision = split_hub_ref(ref)
    try:
        return Path(hf_hub_download(repo_id, MANIFEST_NAME, revision=revision, cache_dir=cache_dir / "hub"))
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


class PreparationCancelled(LayerlineError):
    """A Release stopped a preparation under way."""


class Preparation:
    """One Prepare request's background work and its inventory."""

    def __init__(self, ref: str, start: int, end: int, *, stage0: bool, cache_dir: Path,
                 manifest_sha256: str | None = None, file_sources: Sequence[str] = (),
                 token: str | None = None, index: FileIndex | None = None) -> None:
        self.ref, self.layer_start, self.layer_end, self.stage0 = ref, start, end, stage0
        self.cache = ContentCache(cache_dir)
        self.manifest_sha256 = manifest_sha256
        self.file_sources = list(file_sources)
        self._token = token
        self._index = index  # where this stage serves what it prepared to other stages
        self._lock = threading.Lock()
        self._state = PrepareState.PREPARING
        self._done_bytes = 0  # files complete
        self._current_bytes = 0  # of the file under way: received or hashed so far
        self._total = 0
        self._layers_ready = 0
        self._error = ""
        self._sources: dict[str, list[int]] = {}
        self._hashed = 0
        self._files: dict[str, str] = {}
        self.package: LayerPackage | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"prepare-{start}-{end}", daemon=True)

    def start(self) -> Preparation:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> InventoryReport:
        self._thread.join(timeout)
        return self.inventory()

    def cancel(self) -> None:
        """Stop the work (a Release): it fails at the next chunk hashed or received, writes no more."""
        self._cancelled.set()

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise PreparationCancelled("the preparation was cancelled: the claim was released")

    def inventory(self) -> InventoryReport:
        with self._lock:
            return InventoryReport(
                self._state, self._done_bytes + self._current_bytes, self._total, self._layers_ready,
                self._error, {k: (v[0], v[1]) for k, v in self._sources.items()}, self._hashed,
                dict(self._files))

    # ------------------------------------------------------------ counters

    def _count_present(self, n: int) -> None:
        self._check_cancelled()
        with self._lock:
            self._current_bytes += n

    def _count_hashed(self, n: int) -> None:
        self._check_cancelled()
        with self._lock:
            self._hashed += n
            self._current_bytes += n

    def _count_source(self, source: str, n: int, files: int = 0) -> None:
        with self._lock:
            counts = self._sources.setdefault(source, [0, 0])
            counts[0] += n
            counts[1] += files

    def _received(self, source: str) -> Callable[[int], None]:
        def count(n: int) -> None:
            self._count_present(n)
            self._count_source(source, n)
        return count

    def _file_done(self, relative: str, size: int, source: str, layer: bool) -> None:
        with self._lock:
            self._done_bytes += size
            self._current_bytes = 0
            self._files[relative] = source
            self._layers_ready += layer
        if source in (LOCAL, CACHE, HUB):  # fetched bytes were counted as they arrived
            self._count_source(source, size, 1)
        else:
            self._count_source(source, 0, 1)
        log.info("event=file_ready path=%s source=%s bytes=%d", relative, source, size)

    # ------------------------------------------------------------ work

    def _run(self) -> None:
        sources = [FileSource(endpoint, self._token) for endpoint in self.file_sources]
        try:
            self._prepare(sources)
        except Exception as exc:  # reported through Inventory, never raised into gRPC threads
            with self._lock:
                self._state = PrepareState.FAILED
                self._error = str(exc)
        finally:
            for source in sources:
                source.close()

    def _prepare(self, sources: list[FileSource]) -> None:
        manifest_path, local_root = self._manifest(sources)
        manifest_sha = self.manifest_sha256 or sha256_file(manifest_path)
        package = LayerPackage.open(manifest_path.parent)
        files = range_files(package, self.layer_start, self.layer_end, self.stage0)
        with self._lock:
            self._total = sum(package.manifest.file(f).bytes for f in files)
        layer_files = set(package.manifest.layer_files(self.layer_start, self.layer_end))
        placed: dict[str, Path] = {}
        for relative in files:
            self._check_cancelled()
            entry = package.manifest.file(relative)
            placed[relative], source = self._materialize(package, entry, manifest_sha, local_root, sources)
            self._file_done(relative, entry.bytes, source, relative in layer_files)
        if local_root is not None and all(self._files[f] == LOCAL for f in files):
            ready = LayerPackage.open(local_root)
        else:
            ready = LayerPackage.open(self.cache.view(manifest_sha, manifest_path, placed))
        if self._index is not None:
            self._index.serve_package(manifest_sha, ready)
        with self._lock:
            self.package = ready
            self._state = PrepareState.READY

    def _manifest(self, sources: list[FileSource]) -> tuple[Path, Path | None]:
        """The manifest to prepare from, and the package folder here when it holds it."""
        expected = self.manifest_sha256
        reasons = []
        local = Path(self.ref).expanduser()
        if (local / MANIFEST_NAME).is_file():
            actual = sha256_file(local / MANIFEST_NAME)
            if expected is None or actual == expected:
                return local / MANIFEST_NAME, local
            reasons.append(f"the package {self.ref} on this stage has manifest sha256 {actual}, but the "
                           f"coordinator's is {expected}")
        if expected is not None and (cached := self.cache.manifest(expected)) is not None:
            return cached, None
        if is_hub_id(self.ref):
            try:
                path = _hub_manifest(self.ref, self.cache.root)
                if expected is None or sha256_file(path) == expected:
                    return path, None
                reasons.append(f"the Hub's {self.ref} has another manifest than the coordinator's")
            except LayerlineError as exc:
                reasons.append(exc.message)
        elif not reasons:
            reasons.append(neither_folder_nor_hub(self.ref))
        if expected is not None:
            want = WantedFile(MANIFEST_NAME, expected, None)
            for source in sources:
                try:
                    blob = self._fetch(source, expected, want)
                except LayerlineError as exc:
                    reasons.append(exc.message)
                    continue
                with self._lock:
                    self._current_bytes = 0
                staged = self.cache.package_root(expected) / MANIFEST_NAME
                self.cache.view(expected, blob, {})
                return staged, None
        raise ManifestError("cannot read the package manifest: " + "; ".join(reasons),
                            hint="give every stage the same package version: a folder on each machine, "
                                 "a Hub repo id, or let stage 0 serve it (it does unless --no-serve-files)")

    def _count_present_undo(self, n: int) -> None:
        with self._lock:
            self._current_bytes -= n

    def _materialize(self, package: LayerPackage, entry: FileEntry, manifest_sha: str,
                     local_root: Path | None, sources: list[FileSource]) -> tuple[Path, str]:
        """The verified file for `entry` and its source, from the first source that has it."""
        reasons = []
        if local_root is not None:
            path = package.path(entry.path)
            if self.cache.check(path, entry.sha256, entry.bytes, self._count_hashed):
                return path, LOCAL
            reasons.append(f"{entry.path} ({'sha256 mismatch' if path.is_file() else 'missing'}) in "
                           f"{local_root}")
            self._reset_current()
        blob = self.cache.blob(entry.sha256)
        if self.cache.check(blob, entry.sha256, entry.bytes, self._count_hashed):
            return blob, CACHE
        self._reset_current()
        if is_hub_id(self.ref) and local_root is None:
            try:
                return self._from_hub(entry, manifest_sha), HUB
            except LayerlineError as exc:
                reasons.append(exc.message)
                self._reset_current()
        want = WantedFile(entry.path, entry.sha256, entry.bytes)
        for source in sources:
            try:
                return self._fetch(source, manifest_sha, want), source.name
            except LayerlineError as exc:
                reasons.append(exc.message)
                self._reset_current()
        raise ChecksumError(f"cannot prepare {entry.path}: " + "; ".join(reasons), bad_files=[entry.path],
                            hint="check each source named: `layerline pkg verify` the package there, and "
                                 "the network between the stages; a stage that cannot read the package "
                                 "fetches it from stage 0 (unless --no-serve-files) when Prepare names it")

    def _fetch(self, source: FileSource, manifest_sha: str, want: WantedFile) -> Path:
        return fetch_from(source, self.cache, manifest_sha, want, on_bytes=self._received(source.name),
                          on_hashed=self._count_hashed, on_restart=self._count_present_undo)

    def _reset_current(self) -> None:
        with self._lock:
            self._current_bytes = 0

    def _from_hub(self, entry: FileEntry, manifest_sha: str) -> Path:
        """One file from the Hub (huggingface_hub resumes a broken download), checked, into the cache."""
        from huggingface_hub import hf_hub_download

        repo_id, revision = split_hub_ref(self.ref)
        try:
            path = Path(hf_hub_download(repo_id, entry.path, revision=revision,
                                        local_dir=self.cache.root / "hub" / manifest_sha))
        except Exception as exc:  # huggingface_hub raises many kinds; all mean "cannot fetch"
            raise LayerlineError(f"the Hub: {exc}") from exc
        if not self.cache.check(path, entry.sha256, entry.bytes, self._count_hashed):
            path.unlink(missing_ok=True)
            raise LayerlineError(f"the Hub's {entry.path} failed verification (size or sha256 mismatch)")
        return self.cache.adopt(path, entry.sha256)
