"""The speculation settings stage 0 serves with, the draft they name, and their replacement.

At start the settings come from `resolve_speculation` (flag > config > package). A
`draft-model` strategy loads its draft in the background (`DraftLoader`), in parallel with
the pipeline's bring-up; an `ngram` strategy needs nothing. Until a draft is ready, or if it
fails, requests decode plainly and `to_json()` says why: the server never waits on a draft.

`with_draft` builds the settings of a runtime change (`PUT /v1/draft`); `replace` serves
them once their draft is ready and `clear` turns speculation off (`DELETE /v1/draft`). Such
changes live in this process only: a restart resolves the settings afresh.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerline.errors import LayerlineError, SourceError
from layerline.packager.source import is_hub_id
from layerline.packager.speculative import (
    NGRAM,
    local_draft_fingerprint,
    require_same_tokenizer,
    strategy_name_for,
)
from layerline.packager.window_spec import FIELDS, PartialWindowSpec

from .draft_loader import DraftLoader, DraftState
from .settings import SpeculationSettings

log = logging.getLogger("layerline.speculative")

SOURCE_PUT = "runtime PUT /v1/draft"
SOURCE_DELETE = "runtime DELETE /v1/draft"


@dataclass(frozen=True)
class Served:
    """The settings served at one moment, and the loader of their draft (None: no model)."""

    settings: SpeculationSettings
    loader: DraftLoader | None

    def draft_state(self) -> DraftState:
        """none, loading, ready or failed (with the reason)."""
        return self.loader.state if self.loader is not None else DraftState("none")

    def inactive_reason(self) -> str | None:
        """Why requests decode plainly now, or None when speculation is active."""
        settings = self.settings
        if not settings.enabled:
            return settings.reason or "speculation is off"
        if settings.type == "ngram":
            return None
        state = self.draft_state()
        if state.state == "ready":
            return None
        if state.state == "loading":
            return f"draft {settings.draft_model} is still loading"
        return f"draft {settings.draft_model} failed: {state.reason}"


class ServedSpeculation:
    """The speculation settings stage 0 serves with, and the draft model they name."""

    def __init__(self, settings: SpeculationSettings, *, target_fingerprint: str, cache_dir: Path,
                 weights: str) -> None:
        self.target_fingerprint = target_fingerprint
        self.cache_dir = cache_dir
        self.weights = weights
        self._lock = threading.Lock()
        self._settings = settings
        self._loader: DraftLoader | None = None
        self._pending: tuple[SpeculationSettings, DraftLoader] | None = None
        self._failed: DraftState | None = None  # the last replacement that failed to load

    def start(self) -> ServedSpeculation:
        """Begin loading the draft the settings name (in the background)."""
        if self._settings.enabled and self._settings.type == "draft-model":
            self._loader = self._load(self._settings)
        return self

    def _load(self, settings: SpeculationSettings) -> DraftLoader:
        assert settings.draft_model is not None
        return DraftLoader(settings.draft_model, self.target_fingerprint, self.cache_dir,
                           self.weights).start()

    def now(self) -> Served:
        """The settings served now and their draft, read together."""
        with self._lock:
            return Served(self._settings, self._loader)

    def is_current(self, loader: DraftLoader) -> bool:
        """Whether `loader`'s draft is the one served now."""
        return loader is self._loader

    def replace(self, settings: SpeculationSettings) -> DraftLoader | None:
        """Serve with `settings` once their draft is ready; until then the current ones stay.

        Returns the loader of the new draft (None for settings that need no model).
        """
        if not (settings.enabled and settings.type == "draft-model"):
            with self._lock:
                self._settings, self._loader, self._pending, self._failed = settings, None, None, None
            return None
        with self._lock:
            current = self._loader
            if (current is not None and current.reference == settings.draft_model
                    and current.state.state == "ready"):
                # Same draft, other window policy: keep the loaded model, switch now.
                self._settings, self._pending, self._failed = settings, None, None
                return current
        loader = self._load(settings)
        with self._lock:
            self._pending, self._failed = (settings, loader), None
        threading.Thread(target=self._switch_when_loaded, args=(settings, loader),
                         name="draft-switch", daemon=True).start()
        return loader

    def _switch_when_loaded(self, settings: SpeculationSettings, loader: DraftLoader) -> None:
        state = loader.wait()
        with self._lock:
            if self._pending is None or self._pending[1] is not loader:
                return  # replaced again meanwhile
            self._pending = None
            if state.state == "ready":
                self._settings, self._loader = settings, loader
            else:
                self._failed = state  # the current settings stay; the failure stays visible
        if state.state == "ready":
            log.info("event=draft_switched reference=%s", settings.draft_model)

    def clear(self) -> None:
        """Speculation off from the next request on; the draft (loaded or loading) is dropped."""
        settings = self._settings.off("speculation turned off by DELETE /v1/draft")
        self.replace(dataclasses.replace(settings, sources={**settings.sources, "enabled": SOURCE_DELETE}))

    def with_draft(self, draft_model: str, window: PartialWindowSpec) -> SpeculationSettings:
        """Settings that speculate with `draft_model` ("ngram": prompt lookup), with the window
        settings `window` gives; those it leaves open stay as they are.

        A local draft's tokenizer is checked here, before anything loads; a Hub draft's is
        checked once it is fetched (a mismatch then shows in `to_json()["failed_draft"]`).
        """
        current = self._settings
        spec = window.over(current.window_spec).validate()
        changed = [*(FIELDS[name] for name in window.given()), "enabled", "strategy", "type", "draft_model",
                   "tokenizer_fingerprint"]
        sources = {**current.sources, **dict.fromkeys(changed, SOURCE_PUT)}
        timing = {"overlap": current.overlap, "run_ahead": current.run_ahead, "tree": current.tree}
        if draft_model == NGRAM:  # prompt-lookup drafting: no model to load
            return SpeculationSettings(enabled=True, strategy=NGRAM, type="ngram", window_spec=spec,
                                       sources=sources, **timing)
        fingerprint = self._check_draft(draft_model)
        return SpeculationSettings(
            enabled=True, strategy=strategy_name_for(draft_model), type="draft-model",
            draft_model=draft_model, tokenizer_fingerprint=fingerprint, window_spec=spec, sources=sources,
            **timing)

    def _check_draft(self, reference: str) -> str | None:
        """The draft's tokenizer fingerprint when it is local (None for a Hub draft); refuses a mismatch."""
        try:
            fingerprint = local_draft_fingerprint(reference)
        except SourceError as exc:  # its detail may quote the file: say only what it is not
            raise LayerlineError(f"draft {reference} is not a layer package, GGUF file or Hugging Face "
                                 "model folder", hint="give one of those, or a Hub repo id") from exc
        if fingerprint is None:
            if not is_hub_id(reference):
                raise LayerlineError(f"draft {reference} does not exist on stage 0",
                                     hint="give a package folder, a GGUF file or a model folder on "
                                          "stage 0's machine, or a Hub repo id")
            return None
        require_same_tokenizer(reference, fingerprint, self.target_fingerprint)
        return fingerprint

    def pending(self) -> DraftState | None:
        """The state of a draft being loaded to replace the current one, if any."""
        pending = self._pending
        return pending[1].state if pending is not None else None

    def to_json(self) -> dict[str, Any]:
        """The settings with their sources, the draft's state, and whether speculation is active."""
        served = self.now()
        reason = served.inactive_reason()
        pending = self.pending()
        failed = self._failed
        return {**served.settings.to_json(), "active": reason is None, "inactive_reason": reason,
                "draft": served.draft_state().to_json(),
                "pending_draft": pending.to_json() if pending is not None else None,
                "failed_draft": failed.to_json() if failed is not None else None}
