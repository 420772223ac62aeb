"""Stage 0's draft model: resolved from its reference, checked, loaded in the background.

A reference is a local package folder, a local GGUF (built into a package in the
cache first), a Hub package repo (`org/name[@revision]`) or a Hub GGUF repo
(`org/name:QUANT`). A draft whose tokenizer fingerprint differs from the
target's is refused. Nothing here ever stops the server: a draft that cannot be
had leaves the state `failed` with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerline.errors import LayerlineError
from layerline.packager.manifest import MANIFEST_NAME, read_manifest
from layerline.packager.source import is_hub_id
from layerline.packager.speculative import require_same_tokenizer

log = logging.getLogger("layerline.draft")


@dataclass(frozen=True)
class DraftState:
    state: str  # "none" | "loading" | "ready" | "failed"
    reference: str | None = None
    reason: str | None = None
    fingerprint: str | None = None
    load_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "reference": self.reference, "reason": self.reason,
                "fingerprint": self.fingerprint, "load_seconds": self.load_seconds}


def draft_package_dir(reference: str, cache_dir: Path) -> Path:
    """A local package folder for `reference`, building or downloading it if needed."""
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
                                           cache_dir=cache_dir / "hub"))
        except Exception as exc:  # huggingface_hub raises many kinds: all mean "cannot fetch"
            raise LayerlineError(f"draft {reference} could not be downloaded: {exc}") from exc
        if (local / MANIFEST_NAME).is_file():
            return local
    build_package(reference, built, BuildOptions(quiet=True, force=True))  # Hub model or GGUF repo
    return built


class DraftLoader:
    """Loads one draft in a background thread; `state` says how far it got."""

    def __init__(self, reference: str, target_fingerprint: str, cache_dir: Path, weights: str) -> None:
        self.reference = reference
        self.target_fingerprint = target_fingerprint
        self.cache_dir = cache_dir
        self.weights = weights
        self.model: Any = None
        self._state = DraftState("loading", reference)
        self._thread = threading.Thread(target=self._load, name="draft-loader", daemon=True)

    @property
    def state(self) -> DraftState:
        return self._state

    def start(self) -> DraftLoader:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> DraftState:
        self._thread.join(timeout)
        return self._state

    def _load(self) -> None:
        from ..decode.local_pipeline import LocalPipeline

        started = time.monotonic()
        try:
            folder = draft_package_dir(self.reference, self.cache_dir)
            fingerprint = read_manifest(folder).tokenizer.fingerprint
            require_same_tokenizer(self.reference, fingerprint, self.target_fingerprint)
            self.model = LocalPipeline.load(folder, weights=self.weights, tokenizer=False)
        except Exception as exc:  # any failure leaves the server serving without the draft
            reason = str(exc) if isinstance(exc, LayerlineError) else f"{type(exc).__name__}: {exc}"
            self._state = DraftState("failed", self.reference, reason=reason)
            log.warning("event=draft_failed reference=%s reason=%s", self.reference, reason)
            return
        seconds = round(time.monotonic() - started, 2)
        self._state = DraftState("ready", self.reference, fingerprint=fingerprint, load_seconds=seconds)
        log.info("event=draft_ready reference=%s seconds=%.2f", self.reference, seconds)
