"""`layerline pkg verify`: recompute every file's sha256 against the manifest, then check that the
tokenizer is the one the manifest describes and fits the embedding."""

from __future__ import annotations

from pathlib import Path

from layerline.progress import byte_progress

from .package import LayerPackage
from .tokenizer import check_package_tokenizer


def verify_package(root: Path | str, *, quiet: bool = False) -> int:
    """Check every file of a package; return how many, or raise ChecksumError (or PackageFileError)
    naming the bad."""
    package = LayerPackage.open(root)
    files = package.all_files()
    total = sum(package.manifest.file(f).bytes for f in files)
    with byte_progress(f"verifying {Path(root).name}", total, quiet=quiet) as advance:
        package.verify(files, on_bytes=advance)
    check_package_tokenizer(package.root, package.manifest)
    return len(files)
