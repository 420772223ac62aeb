"""A draft model from its reference: a package folder, or a GGUF file, model folder or Hub repo
built into a package once (cached); checked to share the target's tokenizer, loaded whole.

A reference is a local package folder, a local GGUF or Hugging Face model folder, a Hub
package repo (`org/name[@revision]`) or a Hub GGUF repo (`org/name:QUANT`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from layerline.errors import LayerlineError
from layerline.packager.manifest import MANIFEST_NAME, read_manifest
from layerline.packager.source import is_hub_id
from layerline.packager.speculative import require_same_tokenizer

from .local_pipeline import LocalPipeline


def draft_package_dir(reference: str, cache_dir: Path, *, fetch: bool = True) -> Path:
    """A local package folder for `reference`, building or downloading it if needed; with
    `fetch=False` a Hub reference must already be in `cache_dir` (as stage 0 left it)."""
    from layerline.packager.build import BuildOptions, build_package

    path = Path(reference).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return path
    key = hashlib.sha256(str(path.resolve() if path.exists() else reference).encode()).hexdigest()[:16]
    built = cache_dir / "drafts" / key
    if (built / MANIFEST_NAME).is_file():
        return built
    if path.exists():
        build_package(str(path), built, BuildOptions(quiet=True, force=True))
        return built
    if not is_hub_id(reference):
        raise LayerlineError(f"draft {reference} does not exist",
                             hint="give a package folder, a GGUF file, or a Hub repo id")
    if ":" not in reference:
        # A Hub package repo: fetch it whole (a draft runs entirely on stage 0).
        from huggingface_hub import snapshot_download

        repo_id, _, revision = reference.partition("@")
        try:
            local = Path(snapshot_download(repo_id, revision=revision or None,
                                           cache_dir=cache_dir / "hub", local_files_only=not fetch))
        except Exception as exc:  # huggingface_hub raises many kinds: all mean "cannot fetch"
            if not fetch:
                raise _not_here(reference, cache_dir) from exc
            raise LayerlineError(f"draft {reference} could not be downloaded: {exc}") from exc
        if (local / MANIFEST_NAME).is_file():
            return local
    if not fetch:
        raise _not_here(reference, cache_dir)
    build_package(reference, built, BuildOptions(quiet=True, force=True))  # Hub model or GGUF repo
    return built


def _not_here(reference: str, cache_dir: Path) -> LayerlineError:
    return LayerlineError(
        f"draft {reference} is not on this machine: it is a Hub reference not cached in {cache_dir}, "
        "and this command fetches nothing",
        hint=f"build it here (`layerline pkg build {reference} -o DIR`) and rebuild the package with "
             f"`--draft-model DIR`, or serve the package once with stage 0 on this machine so that it "
             f"caches the draft in {cache_dir}")


def resolve_draft(reference: str, target_fingerprint: str, cache_dir: Path, *,
                  fetch: bool = True) -> tuple[Path, str]:
    """The draft's package folder and tokenizer fingerprint; refuses one whose tokenizer differs."""
    folder = draft_package_dir(reference, cache_dir, fetch=fetch)
    fingerprint = read_manifest(folder).tokenizer.fingerprint
    require_same_tokenizer(reference, fingerprint, target_fingerprint)
    return folder, fingerprint


def load_draft(reference: str, target_fingerprint: str, cache_dir: Path,
               weights: str = "auto") -> tuple[LocalPipeline, str]:
    """The draft model and its tokenizer fingerprint; refuses one whose tokenizer differs."""
    folder, fingerprint = resolve_draft(reference, target_fingerprint, cache_dir)
    return LocalPipeline.load(folder, weights=weights, tokenizer=False), fingerprint
