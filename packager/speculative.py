"""The package's speculative-decoding block: draft strategies, checked against the target."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerline.errors import LayerlineError, TokenizerMismatchError

from .manifest import (
    MANIFEST_NAME,
    Calibration,
    Manifest,
    SpeculativeDecoding,
    Strategy,
    read_manifest,
    write_json_atomic,
)
from .window_spec import WindowError, WindowSpec

NGRAM = "ngram"  # the `--draft-model` that names prompt-lookup drafting (no model)


@dataclass(frozen=True)
class DraftSpec:
    """One `--draft-model` as the user gave it."""

    reference: str
    name: str | None = None
    window_spec: WindowSpec = field(default_factory=WindowSpec)


def strategy_name_for(reference: str) -> str:
    """A readable default strategy name from a draft reference (`org/Qwen-0.5B:Q4` -> `qwen-0.5b-q4`)."""
    tail = reference.rstrip("/").split("/")[-1]
    tail = re.sub(r"\.(gguf|safetensors)$", "", tail, flags=re.IGNORECASE)
    name = re.sub(r"[^a-z0-9.]+", "-", tail.lower()).strip("-")
    return name or "draft"


def local_draft_fingerprint(reference: str) -> str | None:
    """The tokenizer fingerprint of a local draft (package folder or GGUF), or None if remote."""
    path = Path(reference).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return read_manifest(path).tokenizer.fingerprint
    if path.exists():
        return _fingerprint_of_source(str(path))
    return None


def require_same_tokenizer(reference: str, fingerprint: str, target_fingerprint: str) -> None:
    """Refuse a draft whose tokenizer differs from the target's: its token ids mean other text."""
    if fingerprint != target_fingerprint:
        raise TokenizerMismatchError(
            f"draft {reference} has tokenizer {fingerprint}, the target has "
            f"{target_fingerprint}: its tokens would mean other text",
            hint="choose a draft of the same model family, with the same tokenizer")


def _fingerprint_of_source(reference: str) -> str:
    import tempfile

    from .source import open_source
    from .tokenizer import save_tokenizer, tokenizer_fingerprint

    source = open_source(reference)
    with tempfile.TemporaryDirectory(prefix="layerline-draft-tok-") as tmp:
        save_tokenizer(source.tokenizer(), Path(tmp))
        return tokenizer_fingerprint(Path(tmp) / "tokenizer.json")


def build_speculative_block(
    drafts: list[DraftSpec], default: str | None, target_fingerprint: str
) -> SpeculativeDecoding | None:
    """Strategies for every draft; a local draft whose tokenizer differs is refused."""
    if not drafts:
        if default is not None:
            raise LayerlineError("--default-strategy needs at least one --draft-model")
        return None
    strategies: dict[str, Strategy] = {}
    for spec in drafts:
        name = spec.name or strategy_name_for(spec.reference)
        if name in strategies:
            raise LayerlineError(
                f"two draft strategies are named {name!r}", hint="give each --strategy-name"
            )
        try:
            window = spec.window_spec.validate()
        except WindowError as exc:
            raise WindowError(f"draft {spec.reference}: {exc.message}", hint=exc.hint) from exc
        if spec.reference == NGRAM:
            strategies[name] = Strategy(type="ngram", window_spec=window)
            continue
        fingerprint = local_draft_fingerprint(spec.reference)
        if fingerprint is not None:
            require_same_tokenizer(spec.reference, fingerprint, target_fingerprint)
        strategies[name] = Strategy(
            type="draft-model",
            draft_model=spec.reference,
            # A remote draft is checked when stage 0 loads it; record the target's print.
            tokenizer_fingerprint=fingerprint or target_fingerprint,
            window_spec=window,
        )
    chosen = default or next(iter(strategies))
    if chosen not in strategies:
        raise LayerlineError(
            f"--default-strategy {chosen!r} is not among the strategies {sorted(strategies)}"
        )
    return SpeculativeDecoding(default=chosen, strategies=strategies)


def store_calibrations(root: Path | str, calibrations: Mapping[str, Calibration]) -> Manifest:
    """Rewrite the package's manifest with these strategies' calibrations replaced, atomically.

    Only the manifest changes; `files` (and so every checksum `pkg verify` checks) stays as it was.
    """
    root = Path(root)
    manifest = read_manifest(root)
    spec = manifest.speculative_decoding
    declared = sorted(spec.strategies) if spec else []
    unknown = [name for name in calibrations if name not in declared]
    if unknown:
        raise LayerlineError(f"package {root} declares no strategy {', '.join(map(repr, unknown))} "
                             f"(it has: {', '.join(declared) or 'none'})",
                             hint="choose one of its strategies with --strategy")
    if spec is None:  # nothing to calibrate, nothing to write
        return manifest
    strategies = {name: replace(strategy, calibration=calibrations.get(name, strategy.calibration))
                  for name, strategy in spec.strategies.items()}
    manifest = replace(manifest, speculative_decoding=replace(spec, strategies=strategies))
    write_json_atomic(root / MANIFEST_NAME, manifest.to_json())
    return manifest
