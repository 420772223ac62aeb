"""Package files that hash right and are still wrong (issue 25, item 9): `layerline run` says
which file and what is wrong on an `error:` line, never with a traceback."""

from __future__ import annotations

import json
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
