"""Downloading a model source from the Hugging Face Hub (`org/name`, or `org/name:QUANT`)."""

from __future__ import annotations

from pathlib import Path

from layerline.errors import SourceError

SAFETENSORS_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json",
                        "tokenizer*", "special_tokens_map.json", "chat_template*",
                        "generation_config.json"]


def pick_gguf(files: list[str], quant: str) -> str:
    """The one .gguf file of a repo whose name carries the quantization `quant` (e.g. Q4_K_M)."""
    wanted = quant.lower()
    exact = [f for f in files if f.lower() == wanted or f.lower().rsplit("/", 1)[-1] == wanted]
    if len(exact) == 1:
        return exact[0]
    matches = [f for f in files if f.lower().endswith(".gguf") and wanted in f.lower()]
    if len(matches) != 1:
        ggufs = [f for f in files if f.lower().endswith(".gguf")]
        raise SourceError(
            f"{len(matches)} GGUF files match {quant!r}" + (f": {matches}" if matches else ""),
            hint=f"name one of: {', '.join(ggufs) or '(the repo has no .gguf files)'}",
        )
    return matches[0]


def download_hub_source(reference: str, *, cache_dir: Path | None = None) -> Path:
    """Download a Hub source; return the local folder (safetensors) or file (GGUF)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, quant = reference.partition(":")
    try:
        if quant:
            filename = pick_gguf(HfApi().list_repo_files(repo_id), quant)
            return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir))
        return Path(snapshot_download(repo_id, allow_patterns=SAFETENSORS_PATTERNS,
                                      cache_dir=cache_dir))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise SourceError(
            f"could not download {reference} from the Hugging Face Hub: {exc}",
            hint="check the repo id and your network; for private repos run `hf auth login`",
        ) from exc
