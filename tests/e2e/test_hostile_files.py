"""Package files that hash right and are still wrong (issue 25, item 9): `layerline run` says
which file and what is wrong on an `error:` line, never with a traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from layerline.packager.manifest import MANIFEST_NAME
from layerline.packager.package import sha256_file

LAYER = "layers/00001.safetensors"


def _rewritten(package: Path, root: Path, relative: str, write: Callable[[Path], None]) -> Path:
    """A copy of `package` whose file `relative` is rewritten, its manifest entry updated to match."""
    copy = root / "pkg"
    shutil.copytree(package, copy)
    write(copy / relative)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    for entry in manifest["files"]:
        if entry["path"] == relative:
            entry["sha256"], entry["bytes"] = sha256_file(copy / relative), (copy / relative).stat().st_size
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    return copy


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def _garbage_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 20) + b"this is not json!!!!" + bytes(64))


def _huge_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2**62) + bytes(64))


def _missing_tensor(path: Path) -> None:
    tensors = load_file(path)
    tensors.pop(next(name for name in tensors if name.endswith("mlp.up_proj.weight")))
    save_file(tensors, path)


def _wrong_shape(path: Path) -> None:
    tensors = load_file(path)
    name = next(name for name in tensors if name.endswith("mlp.up_proj.weight"))
    tensors[name] = np.zeros((3, 5), dtype=tensors[name].dtype)
    save_file(tensors, path)


@pytest.mark.parametrize(("relative", "write", "says"), [
    (LAYER, _truncated, "truncated"),
    (LAYER, _garbage_header, "not safetensors JSON"),
    (LAYER, _huge_header, "header claims"),
    (LAYER, _missing_tensor, "do not hold the tensors"),
    (LAYER, _wrong_shape, "do not hold the tensors"),
    ("tokenizer.json", lambda path: path.write_text('{"model": {"type": "BPE", "vocab": 7}}'),
     "tokenizer"),
], ids=["truncated", "garbage-header", "2^62-header", "missing-tensor", "wrong-shape", "tokenizer"])
def test_a_file_that_hashes_right_but_is_wrong_is_an_error_line(tiny_llama_package, tmp_path, relative,
                                                                 write, says):
    package = _rewritten(tiny_llama_package, tmp_path, relative, write)
    done = subprocess.run([sys.executable, "-m", "layerline", "run", str(package), "--prompt", "Hi",
                           "--max-tokens", "1"], capture_output=True, text=True, timeout=120)
    said = " ".join(done.stderr.split())  # rich wraps long lines
    assert done.returncode == 1 and "error:" in said and says in said, done.stderr
    assert "Traceback" not in said and relative in said


def test_a_vocab_size_that_disagrees_with_the_embedding_is_an_error_line(tiny_llama_package, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_llama_package, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["config"]["vocab_size"] += 7
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    done = subprocess.run([sys.executable, "-m", "layerline", "run", str(copy), "--prompt", "Hi",
                           "--max-tokens", "1"], capture_output=True, text=True, timeout=120)
    said = " ".join(done.stderr.split())
    assert done.returncode == 1 and "error:" in said and "embed" in said, done.stderr
    assert "Traceback" not in said


def _layerline(*args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "layerline", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "2000"})  # rich wraps, even in a path
    return done.returncode, " ".join(done.stderr.split())


def _manifest_changed(package: Path, root: Path, change: Callable[[dict], None]) -> Path:
    copy = root / "pkg"
    shutil.copytree(package, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    change(manifest)
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    return copy


def _cut_tokenizer(path: Path, tokens: int = 300) -> None:
    """The tokenizer's first `tokens` tokens, and the merges that make only those."""
    data = json.loads(path.read_text())
    vocab = {piece: i for piece, i in data["model"]["vocab"].items() if i < tokens}
    data["model"]["vocab"] = vocab
    pairs = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    data["model"]["merges"] = [pair for pair in pairs if all(p in vocab for p in [*pair, "".join(pair)])]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < tokens]
    path.write_text(json.dumps(data))


def _token_past_the_embedding(path: Path) -> None:
    data = json.loads(path.read_text())
    data["added_tokens"].append({"id": 60000, "content": "<|far|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(data))


def _with_fingerprint(write: Callable[[Path], None]) -> Callable[[Path], None]:
    """`write`, and the manifest's tokenizer fingerprint made to match (as a careful forger would)."""
    def both(path: Path) -> None:
        from layerline.packager.tokenizer import tokenizer_fingerprint

        write(path)
        manifest_path = path.parent / MANIFEST_NAME
        manifest = json.loads(manifest_path.read_text())
        manifest["tokenizer"]["fingerprint"] = tokenizer_fingerprint(path)
        manifest_path.write_text(json.dumps(manifest))
    return both


def _layers_4096(raw: dict) -> None:
    raw["config"]["num_hidden_layers"] = 4096


@pytest.mark.parametrize(("build", "says"), [
    (lambda package, root: _manifest_changed(package, root, _layers_4096),
     "config.num_hidden_layers is 4096 but 'layers' lists 4 layer files"),
    (lambda package, root: _rewritten(package, root, "tokenizer.json", _cut_tokenizer),
     "is not the tokenizer model-package.json describes"),
    (lambda package, root: _rewritten(package, root, "tokenizer.json",
                                      _with_fingerprint(_token_past_the_embedding)),
     "can produce token id 60000, but the embedding has 49152 rows"),
], ids=["4096-layers-of-4", "300-token-tokenizer", "token-past-the-embedding"])
def test_layer_counts_and_tokenizers_that_disagree_with_the_files_are_refused_at_load_and_in_verify(
        tiny_llama_package, tmp_path, build, says):
    package = build(tiny_llama_package, tmp_path)
    for command in (["run", str(package), "--prompt", "Hi", "--max-tokens", "1"],
                    ["pkg", "verify", str(package)]):
        code, said = _layerline(*command)
        assert code == 1 and "error:" in said and says in said and "Traceback" not in said, (command, said)
        assert "model-package.json" in said and "layerline pkg build" in said


def test_a_tokenizer_smaller_than_the_embedding_is_padding_and_verifies(tiny_llama_package, tmp_path):
    package = _rewritten(tiny_llama_package, tmp_path, "tokenizer.json", _with_fingerprint(_cut_tokenizer))
    code, said = _layerline("pkg", "verify", str(package))
    assert code == 0, said
