"""The layerline a job installs: an sdist of this installation's sources, so the job runs the same code.

An sdist, not a wheel: the CPU kernel (setup.py, runtime/model/native) is compiled where it is
installed, in the job's container, for that machine's CPU.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from layerline.errors import PublishError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Every member's time in the rewritten tarball: the same sources give the same sha256 (a dry run
# shows the hash the real run uploads). After 1980, which wheels (zip files) cannot go below.
FIXED_MTIME = 1704067200  # 2024-01-01T00:00:00Z
SPEC_HINT = ("or pass --layerline-spec with what the job should install instead: a PyPI name, "
             "a git URL (git+https://…) or a wheel URL")


@dataclass(frozen=True)
class Sdist:
    """A built sdist on disk and its identity."""

    path: Path
    sha256: str
    bytes: int


def find_layerline_source() -> Path:
    """The checkout this layerline runs from, or the one pip installed it from (direct_url.json)."""
    import layerline

    candidates = [Path(layerline.__file__).resolve().parents[1]]
    try:
        direct = json.loads(metadata.distribution("layerline").read_text("direct_url.json") or "null")
    except metadata.PackageNotFoundError:
        direct = None
    if direct and "dir_info" in direct and direct.get("url", "").startswith("file:"):
        candidates.append(Path(unquote(urlparse(direct["url"]).path)))
    for candidate in candidates:
        if is_layerline_source(candidate):
            return candidate
    raise PublishError(
        f"no layerline sources found to build the job's layerline from (looked in "
        f"{', '.join(str(c) for c in candidates)})",
        hint=f"run `layerline pkg job` from a layerline checkout (`pip install -e .` there), {SPEC_HINT}",
    )


def is_layerline_source(folder: Path) -> bool:
    """Whether `folder` holds layerline's pyproject.toml and setup.py."""
    try:
        project = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return project.get("name") == "layerline" and (folder / "setup.py").is_file()


def build_sdist(source: Path, out_dir: Path) -> Sdist:
    """Build the sdist of the layerline checkout `source` into `out_dir`, with fixed times and owners."""
    # setuptools' PEP 517 hook in this interpreter: no network, no build isolation (an sdist
    # compiles nothing; the job's pip builds the wheel, kernel included).
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    try:
        result = subprocess.run([sys.executable, "-c", hook, str(out_dir)], cwd=source,
                                capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise PublishError(f"building layerline's sdist from {source} took over 300 s",
                           hint=f"retry, {SPEC_HINT}") from exc
    built = out_dir / (result.stdout.strip().splitlines() or [""])[-1]
    if result.returncode != 0 or not built.name.endswith(".tar.gz") or not built.is_file():
        raise PublishError(
            f"building layerline's sdist from {source} failed: {_last_error(result.stderr + result.stdout)}",
            hint=f"fix that in the checkout (setuptools>=77 must be installed: `pip install -U setuptools`), "
                 f"{SPEC_HINT}",
        )
    data = _reproducible(built.read_bytes())
    built.write_bytes(data)
    return Sdist(path=built, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def _reproducible(sdist: bytes) -> bytes:
    """The tarball rewritten with members sorted, fixed times, no owners, and a gzip header without time."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as src, \
            gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for member in sorted(src.getmembers(), key=lambda m: m.name):
            member.mtime, member.uid, member.gid, member.uname, member.gname = FIXED_MTIME, 0, 0, "", ""
            member.pax_headers = {}
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out.getvalue()


def _last_error(output: str) -> str:
    """The last line of a failed build's output that says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return ((errors or lines or ["no output"])[-1])[:300]
