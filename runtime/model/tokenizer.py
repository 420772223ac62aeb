"""The package's tokenizer: loading it verified, its end-of-generation tokens, streaming text,
each token's raw bytes."""

from __future__ import annotations

import re
from typing import Any

from tokenizers.decoders import ByteLevel

from layerline.errors import PackageFileError
from layerline.packager.package import LayerPackage
from layerline.packager.tokenizer import check_package_tokenizer

# Tokens that end a turn in common chat formats; llama.cpp stops on these too
# (its "end of generation" set), since a GGUF names only one eos id.
END_OF_GENERATION_TEXTS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<|eom_id|>",
    "<end_of_turn>", "</s>",
)


def load_tokenizer(package: LayerPackage) -> Any:
    """The package's Hugging Face tokenizer, after its files matched their sha256 and it was found
    to be the manifest's and to fit the embedding."""
    package.verify(package.manifest.tokenizer.files)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(package.root), local_files_only=True)
    except Exception as exc:  # tokenizers and transformers raise many kinds on a malformed file
        raise PackageFileError(
            f"the tokenizer of {package.root} ({', '.join(package.manifest.tokenizer.files)}) does not load: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
            hint="rebuild the package with `layerline pkg build` from a source whose tokenizer loads",
        ) from exc
    check_package_tokenizer(package.root, package.manifest)
    return tokenizer


def end_of_generation_ids(tokenizer: Any, package: LayerPackage) -> tuple[int, ...]:
    """Token ids that end a generation: the declared eos and the special end-of-turn tokens."""
    ids = set()
    for candidate in (package.manifest.tokenizer.eos_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            ids.add(candidate)
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for text in END_OF_GENERATION_TEXTS:
        if text in special:
            ids.add(int(tokenizer.convert_tokens_to_ids(text)))
    return tuple(sorted(ids))


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character a byte-level BPE vocabulary writes for each byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + shifted)] = byte
            shifted += 1
    return chars


BYTE_LEVEL_CHARS = _byte_level_chars()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's piece for one raw byte


class TokenBytes:
    """A token's raw bytes (OpenAI's logprobs `bytes`), also when it holds part of a character.

    Decoding one token alone gives U+FFFD for a piece of a multi-byte character; its bytes
    are read from its vocabulary entry instead: byte-level BPE writes each byte as one
    character of GPT-2's alphabet, SentencePiece writes a lone byte as `<0xE4>`.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
        self._byte_level = isinstance(tokenizer.backend_tokenizer.decoder, ByteLevel)

    def __call__(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for."""
        if token_id in self._added:  # added tokens are stored as their text
            return self._added[token_id].encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is not None and self._byte_level and all(c in BYTE_LEVEL_CHARS for c in piece):
            return bytes(BYTE_LEVEL_CHARS[c] for c in piece)
        if piece is not None and not self._byte_level and (byte := BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(byte.group(1), 16)])
        return self._tokenizer.decode([token_id]).encode()


class TextStream:
    """Turns tokens into text as they come, holding back what a stop string may yet claim.

    Decoding re-reads a few tokens of context each step (as vLLM does), so
    multi-byte characters split across tokens and leading spaces come out right.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._held = ""
        self.stopped = False  # a stop string was found; no more text follows
        self.text = ""  # everything emitted so far

    def add(self, token: int) -> str:
        """Feed one token; return the text that may be shown now (possibly empty)."""
        if self.stopped:
            return ""
        self._tokens.append(token)
        decode = self._tokenizer.decode
        prefix = decode(self._tokens[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = decode(self._tokens[self._prefix_offset:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        new = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return self._release(self._held + new)

    def finish(self) -> str:
        """The text still held back, once no more tokens will come."""
        if self.stopped:
            return ""
        rest, self._held = self._held, ""
        self.text += rest
        return rest

    def _release(self, pending: str) -> str:
        cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            self.text += pending[:cut]
            return pending[:cut]
        hold = max((_overlap(pending, s) for s in self._stop), default=0)
        ready, self._held = pending[: len(pending) - hold], pending[len(pending) - hold:]
        self.text += ready
        return ready


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
