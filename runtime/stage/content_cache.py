"""A stage's content cache: package files kept by sha256, verifications on record, package views.

    <cache>/blobs/<sha256>            a verified file (any package, any revision)
    <cache>/blobs/<sha256>.partial    a transfer under way, resumed from its size
    <cache>/verified/<key>.json       size + mtime of a file when it last hashed right
    <cache>/packages/<manifest sha>/  a package folder: the manifest, and hard links to blobs
    <cache>/hub/                      Hub downloads under way
    <cache>/locks/<sha256>            held while a stage writes that blob

Every name that becomes a path here is a sha256 (64 lowercase hex digits), checked by each
method that builds one, and each such path is checked to resolve inside the cache's root: a
forged sha256 ("../../victim") never names a file elsewhere.

Identical layers of two packages or revisions are one blob. A view's files are hard
links, so a blob still used by a view has more than one link, and `prune` removes
only blobs with one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerline.atomic_write import write_atomic
from layerline.errors import LayerlineError
from layerline.packager.digest import is_sha256
from layerline.packager.manifest import MANIFEST_NAME
from layerline.packager.package import sha256_file

DEFAULT_CACHE_DIR = Path("~/.cache/layerline/stage")  # a stage's cache unless config or --cache-dir say
PARTIAL = ".partial"


def link_or_copy(source: Path, target: Path) -> None:
    """Put `source` at `target` (replacing what is there) as a hard link, or a copy across devices."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


@dataclass(frozen=True)
class CachedPackage:
    manifest_sha256: str
    model_id: str
    files: int
    bytes: int


@dataclass(frozen=True)
class CacheSummary:
    packages: list[CachedPackage]
    blobs: int
    blob_bytes: int
    unused_blobs: int  # in no package view: `prune` removes them
    unused_bytes: int
    partial_bytes: int  # transfers under way or broken off


class ContentCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.records = root / "verified"
        self.packages = root / "packages"
        self.locks = root / "locks"

    def blob(self, sha256: str) -> Path:
        """Where the verified file of this sha256 is kept."""
        return self._inside(self.blobs, sha256)

    def partial(self, sha256: str) -> Path:
        """Where a transfer of this sha256 is written."""
        return self._inside(self.blobs, sha256, PARTIAL)

    def lock(self, sha256: str) -> Path:
        """The lock file held while this stage writes the blob of this sha256."""
        return self._inside(self.locks, sha256)

    def package_root(self, manifest_sha256: str) -> Path:
        """The package view of a manifest of this sha256."""
        return self._inside(self.packages, manifest_sha256)

    def _inside(self, folder: Path, sha256: str, suffix: str = "") -> Path:
        """folder/<sha256><suffix>, refused unless sha256 is one and the path stays in the cache."""
        if not is_sha256(sha256):
            raise LayerlineError(f"{sha256[:80]!r} is not a sha256 (64 lowercase hex digits): the "
                                 "content cache names no file by it",
                                 hint="the package's manifest or the Claim is malformed: rebuild the "
                                 "package, or update the stage 0 that sent it")
        path = folder / f"{sha256}{suffix}"
        if not path.resolve().is_relative_to(self.root.resolve()):  # a linked folder, say
            raise LayerlineError(f"{path} resolves outside the stage cache {self.root}",
                                 hint=f"remove the link at {folder}")
        return path

    # ------------------------------------------------------------ verification

    def _record_path(self, path: Path) -> Path:
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        return self.records / f"{key}.json"

    def on_record(self, path: Path, sha256: str) -> bool:
        """Whether `path` hashed to `sha256` before and has not changed since (same size and mtime)."""
        try:
            record = json.loads(self._record_path(path).read_text())
            stat = path.stat()
        except (OSError, ValueError):
            return False
        return (record.get("sha256") == sha256 and record.get("path") == str(path.resolve())
                and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns)

    def record(self, path: Path, sha256: str) -> None:
        stat = path.stat()
        data = {"path": str(path.resolve()), "sha256": sha256, "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns}
        write_atomic(self._record_path(path), json.dumps(data).encode())

    def check(self, path: Path, sha256: str, size: int, on_hashed: Callable[[int], None]) -> bool:
        """Whether `path` holds the file with this sha256 and size: from the record when it is
        unchanged since its last verification, else by hashing it (then recorded)."""
        if not path.is_file() or path.stat().st_size != size:
            return False
        if self.on_record(path, sha256):
            return True
        if sha256_file(path, on_hashed) != sha256:
            return False
        self.record(path, sha256)
        return True

    # ------------------------------------------------------------ blobs and views

    def adopt(self, path: Path, sha256: str) -> Path:
        """Move a file verified as `sha256` into the cache (same file system: a rename)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        blob = self.blob(sha256)
        try:
            os.replace(path, blob)
        except OSError:
            shutil.copyfile(path, self.partial(sha256))
            os.replace(self.partial(sha256), blob)
        self.record(blob, sha256)
        return blob

    def view(self, manifest_sha256: str, manifest: Path, files: dict[str, Path]) -> Path:
        """A package folder for `manifest_sha256` holding the manifest and `files` (package path →
        file here), as hard links: what a loader opens like any package folder."""
        root = self.package_root(manifest_sha256)
        target = root / MANIFEST_NAME
        if not target.is_file() or sha256_file(target) != manifest_sha256:
            write_atomic(target, manifest.read_bytes())
        for relative, source in files.items():
            path = root / relative
            if not (path.exists() and os.path.samefile(path, source)):
                link_or_copy(source, path)
        return root

    def manifest(self, manifest_sha256: str) -> Path | None:
        """The manifest of a package view here, if there is one with that sha256."""
        path = self.package_root(manifest_sha256) / MANIFEST_NAME
        if path.is_file() and self.check(path, manifest_sha256, path.stat().st_size, lambda n: None):
            return path
        return None

    # ------------------------------------------------------------ list and prune

    def summary(self) -> CacheSummary:
        from layerline.packager.manifest import read_manifest

        packages = []
        for root in sorted(self.packages.glob("*")) if self.packages.is_dir() else []:
            try:
                model_id = read_manifest(root).model.id
            except LayerlineError:
                model_id = "(unreadable manifest)"
            files = [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
            packages.append(CachedPackage(root.name, model_id, len(files),
                                          sum(p.stat().st_size for p in files)))
        blobs = [p for p in self.blobs.glob("*") if p.is_file()] if self.blobs.is_dir() else []
        whole = [p for p in blobs if not p.name.endswith(PARTIAL)]
        unused = [p for p in whole if p.stat().st_nlink == 1]
        return CacheSummary(
            packages, len(whole), sum(p.stat().st_size for p in whole), len(unused),
            sum(p.stat().st_size for p in unused),
            sum(p.stat().st_size for p in blobs if p.name.endswith(PARTIAL)))

    def prune(self, packages: list[str] | None = None) -> int:
        """Remove the named package views (all of them for ["all"]), then every blob no view uses,
        every broken-off transfer and every record of a file that is gone. Returns bytes freed."""
        freed = 0
        for name in packages or []:
            roots = sorted(self.packages.glob("*" if name == "all" else f"{name}*"))
            if name != "all" and (len(roots) != 1 or not name):
                raise LayerlineError(f"{'no' if not roots else 'more than one'} package {name}… in the "
                                     f"cache {self.root}",
                                     hint="`layerline stage cache list` names the packages it holds")
            for root in roots:
                shutil.rmtree(root)
        for blob in self.blobs.glob("*") if self.blobs.is_dir() else []:
            if blob.name.endswith(PARTIAL) or blob.stat().st_nlink == 1:
                freed += blob.stat().st_size
                blob.unlink()
        for record in self.records.glob("*.json") if self.records.is_dir() else []:
            try:
                gone = not Path(json.loads(record.read_text())["path"]).exists()
            except (OSError, ValueError, KeyError):
                gone = True
            if gone:
                record.unlink()
        return freed
