"""Tokenizers for packages: built from GGUF metadata or copied from a folder, fingerprinted, and
checked against the package that holds them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerline.errors import PackageFileError, SourceError

if TYPE_CHECKING:
    from .manifest import Manifest

# llama.cpp's pre-tokenizers that transformers' GGUF table lacks.
# "smollm": digits one by one, then GPT-2's split (llama.cpp: LLAMA_VOCAB_PRE_TYPE_SMOLLM).
_EXTRA_PRE_TOKENIZERS = ("smollm",)

_GGUF_TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
}


def tokenizer_from_gguf(meta: dict[str, Any], architecture: str, context_length: int) -> Any:
    """A transformers fast tokenizer rebuilt from a GGUF file's vocabulary, merges and template."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    spec = {name: meta[key] for key, name in _GGUF_TOKENIZER_KEYS.items() if key in meta}
    if "tokens" not in spec or "tokenizer_type" not in spec:
        raise SourceError(
            "the GGUF file has no tokenizer (tokenizer.ggml.tokens / tokenizer.ggml.model)",
            hint="use a GGUF converted with its tokenizer, or build from the safetensors folder",
        )
    try:
        backend, _ = convert_gguf_tokenizer(architecture, spec)
    except ValueError as exc:
        raise SourceError(f"cannot rebuild the GGUF's tokenizer: {exc}") from exc
    if spec.get("pre_tokenizer_type") in _EXTRA_PRE_TOKENIZERS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )

    tokens = spec["tokens"]

    def token(key: str) -> str | None:
        index = spec.get(key)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unk_token_id"),
        pad_token=token("pad_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        model_max_length=context_length,
        clean_up_tokenization_spaces=False,
    )


def tokenizer_from_folder(folder: Path) -> Any:
    """The fast tokenizer stored in a Hugging Face model folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here
        raise SourceError(
            f"cannot load the tokenizer in {folder}: {exc}",
            hint="the folder needs tokenizer.json (or a tokenizer transformers can convert) "
            "and tokenizer_config.json",
        ) from exc


def save_tokenizer(tokenizer: Any, out_dir: Path) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json (chat template inside); return the file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    written = sorted(set(os.listdir(out_dir)) - before)
    # Keep the chat template inside tokenizer_config.json too, where every reader looks for it.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    template = getattr(tokenizer, "chat_template", None)
    if template and "chat_template" not in config:
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return written


def tokenizer_fingerprint(tokenizer_json: Path) -> str:
    """sha256 over the vocabulary, the merges and the added tokens of a tokenizer.json.

    Two models share a tokenizer exactly when their fingerprints are equal: the
    same strings map to the same ids, and text splits the same way.
    """
    return _fingerprint_of(json.loads(Path(tokenizer_json).read_text(encoding="utf-8")))


def _fingerprint_of(data: dict[str, Any]) -> str:
    model = data.get("model", {})
    vocab = model.get("vocab", {})
    if isinstance(vocab, dict):
        vocab_items = sorted(vocab.items(), key=lambda kv: kv[1])
    else:  # unigram: a list of [piece, score]
        vocab_items = [(piece, i) for i, (piece, _score) in enumerate(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in data.get("added_tokens", []))
    canonical = json.dumps(
        {"type": model.get("type"), "vocab": vocab_items, "merges": merges, "added": added},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()



def _token_ids(data: dict[str, Any]) -> list[int]:
    """Every token id a tokenizer.json can produce: its vocabulary's and its added tokens'."""
    vocab = data["model"]["vocab"]
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    return [*ids, *(int(token["id"]) for token in data.get("added_tokens", []))]


def check_package_tokenizer(root: Path, manifest: Manifest) -> None:
    """Raise PackageFileError unless the package's tokenizer.json is the one its manifest describes
    and every token id it can produce has a row in the embedding (fewer tokens than rows is
    padding, as in most models; more would index past the embedding)."""
    if "tokenizer.json" not in manifest.tokenizer.files:
        return
    path = Path(root) / "tokenizer.json"
    rebuild = ("rebuild the package with `layerline pkg build` from a source whose tokenizer and "
               "embedding agree")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fingerprint, ids = _fingerprint_of(data), _token_ids(data)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise PackageFileError(f"{path} is not a tokenizer.json ({type(exc).__name__}: {str(exc)[:200]})",
                               hint=rebuild) from exc
    if fingerprint != manifest.tokenizer.fingerprint:
        raise PackageFileError(
            f"{path} is not the tokenizer model-package.json describes: its fingerprint is {fingerprint}, "
            f"the manifest's tokenizer.fingerprint is {manifest.tokenizer.fingerprint}", hint=rebuild)
    rows = int(manifest.config["vocab_size"])
    if ids and max(ids) >= rows:
        raise PackageFileError(
            f"{path} can produce token id {max(ids)}, but the embedding has {rows} rows "
            "(config.vocab_size in model-package.json): that token would have no embedding", hint=rebuild)
