"""An opened layer package on disk: its manifest, safe file paths, and checksums."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from layerline.errors import ChecksumError, ManifestError

from .manifest import Manifest, check_relative_path, read_manifest

HASH_CHUNK = 4 << 20


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, reporting progress in bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest.hexdigest()


@dataclass(frozen=True)
class LayerPackage:
    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | Path) -> LayerPackage:
        """Open a package folder and validate its manifest (files are not hashed here)."""
        root = Path(root)
        return cls(root=root, manifest=read_manifest(root))

    def path(self, relative: str) -> Path:
        """The on-disk path of a package file, refusing anything outside the package."""
        check_relative_path(relative, str(self.root))
        full = (self.root / relative).resolve()
        if not full.is_relative_to(self.root.resolve()):
            raise ManifestError(f"{relative!r} resolves outside the package {self.root}")
        return full

    def bad_files(
        self, paths: Iterable[str], on_bytes: Callable[[int], None] | None = None
    ) -> list[str]:
        """The given package files that are missing, of the wrong size, or fail their sha256."""
        bad = []
        for rel in paths:
            entry = self.manifest.file(rel)
            path = self.path(rel)
            if not path.is_file():
                bad.append(f"{rel} (missing)")
                continue
            size = path.stat().st_size
            if size != entry.bytes:
                bad.append(f"{rel} (size {size}, manifest says {entry.bytes})")
                if on_bytes:
                    on_bytes(entry.bytes)
                continue
            if sha256_file(path, on_bytes) != entry.sha256:
                bad.append(f"{rel} (sha256 mismatch)")
        return bad

    def verify(
        self, paths: Iterable[str], on_bytes: Callable[[int], None] | None = None
    ) -> None:
        """Raise ChecksumError naming every file among `paths` that is bad or missing."""
        bad = self.bad_files(paths, on_bytes)
        if bad:
            raise ChecksumError(
                f"package {self.root} failed verification: " + ", ".join(bad),
                bad_files=bad,
                hint="rebuild or re-download the package; do not load it as it is",
            )

    def all_files(self) -> list[str]:
        return [f.path for f in self.manifest.files]

    def stage0_files(self) -> list[str]:
        """Files stage 0 needs beyond its layers: embedding, head, tokenizer."""
        m = self.manifest
        return [m.shared["embed"], m.shared["head"], *m.tokenizer.files]
