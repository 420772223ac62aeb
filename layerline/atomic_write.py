"""Writing a file whole or not at all: a temp file beside it, then a rename.

Every file layerline writes for others to read (a manifest, a cache record, a benchmark
report) goes through `write_atomic`, so that a reader, or a run stopped midway, never
finds one half-written. It sits at the package's top so that the packager, the runtime
and the CLI may all import it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through a temp file and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; these files are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
