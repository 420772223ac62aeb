"""`layerline pkg build`: a model source in, a verified layer package out, atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from layerline.errors import PackageExistsError
from layerline.progress import byte_progress, step_progress

from .manifest import (
    FORMAT,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    FileEntry,
    Manifest,
    ModelInfo,
    SourceInfo,
    TokenizerInfo,
    write_json_atomic,
)
from .package import sha256_file
from .source import ModelSource, open_source
from .speculative import DraftSpec, build_speculative_block
from .tokenizer import save_tokenizer, tokenizer_fingerprint
from .weights import WeightFormat, encode_tensors, parse_format

EMBED_FILE = "shared/embed.safetensors"
HEAD_FILE = "shared/head.safetensors"


def layer_file(index: int) -> str:
    return f"layers/{index:05d}.safetensors"


@dataclass
class BuildOptions:
    quantize: str = "4bit"
    group_size: int = 32
    force: bool = False
    model_id: str | None = None
    drafts: list[DraftSpec] = field(default_factory=list)
    default_strategy: str | None = None
    quiet: bool = False


def build_package(source: str, output: Path | str, options: BuildOptions | None = None) -> Manifest:
    """Convert SOURCE into a layer package at `output`; nothing is left at `output` on failure."""
    options = options or BuildOptions()
    fmt = parse_format(options.quantize, options.group_size)
    output = Path(output).expanduser()
    if output.exists() and not options.force:
        raise PackageExistsError(
            f"{output} already exists", hint="choose another -o folder, or pass --force to replace it"
        )
    model = open_source(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Built beside OUT and renamed at the end: an interrupted build never leaves a partial OUT.
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a package is meant to be shared
    try:
        manifest = _build_into(staging, model, fmt, options)
        _swap_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _build_into(root: Path, model: ModelSource, fmt: WeightFormat, options: BuildOptions) -> Manifest:
    quiet = options.quiet
    tokenizer = model.tokenizer()
    tokenizer_files = save_tokenizer(tokenizer, root)
    fingerprint = tokenizer_fingerprint(root / "tokenizer.json")
    # Drafts are checked before the long conversion, so a mismatch fails fast.
    speculative = build_speculative_block(options.drafts, options.default_strategy, fingerprint)

    source_info = _hash_source(model, quiet)
    written: dict[str, FileEntry] = {}

    def write(rel: str, tensors: dict) -> None:
        import mlx.core as mx

        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(path), encode_tensors(tensors, fmt), metadata={"format": "mlx"})
        written[rel] = FileEntry(rel, sha256_file(path), path.stat().st_size)

    with step_progress("converting layers", model.num_layers + 2, quiet=quiet) as advance:
        write(EMBED_FILE, model.embed_tensors())
        advance()
        for index in range(model.num_layers):
            write(layer_file(index), model.layer_tensors(index))
            advance()
        write(HEAD_FILE, model.head_tensors())
        advance()

    for name in tokenizer_files:
        path = root / name
        written[name] = FileEntry(name, sha256_file(path), path.stat().st_size)

    manifest = Manifest(
        format=FORMAT,
        schema_version=SCHEMA_VERSION,
        model=ModelInfo(
            id=options.model_id or model.model_id,
            architecture=model.config["model_type"],
            source=source_info,
        ),
        config=model.config,
        dtype=fmt.dtype,
        quantization=fmt.quantization,
        tokenizer=TokenizerInfo(
            files=tokenizer_files,
            chat_template=getattr(tokenizer, "chat_template", None),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            vocab_size=len(tokenizer),
            fingerprint=fingerprint,
        ),
        files=[written[k] for k in sorted(written)],
        layers={i: layer_file(i) for i in range(model.num_layers)},
        shared={"embed": EMBED_FILE, "head": HEAD_FILE},
        speculative_decoding=speculative,
    )
    write_json_atomic(root / MANIFEST_NAME, manifest.to_json())
    return manifest


def _hash_source(model: ModelSource, quiet: bool) -> SourceInfo:
    files = model.source_files()
    total = sum(f.stat().st_size for f in files)
    with byte_progress(f"hashing {model.source_name}", total, quiet=quiet) as advance:
        digests = [(f.name, sha256_file(f, advance)) for f in files]
    if len(digests) == 1:
        digest = digests[0][1]
    else:  # a folder: the hash of its files' names and hashes
        digest = hashlib.sha256("\n".join(f"{n} {d}" for n, d in sorted(digests)).encode()).hexdigest()
    name = model.hub_repo or model.source_name
    return SourceInfo(kind=model.kind, file_name=name, sha256=digest, bytes=total)


def _swap_into_place(staging: Path, output: Path) -> None:
    """Rename the finished build to `output`, replacing (only with --force) what was there."""
    if not output.exists():
        os.replace(staging, output)
        return
    old = output.with_name(f".{output.name}.replaced-{os.getpid()}")
    os.replace(output, old)
    os.replace(staging, output)
    shutil.rmtree(old, ignore_errors=True)
