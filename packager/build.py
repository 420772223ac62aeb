"""`layerline pkg build`: a model source in, a verified layer package out, atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerline.errors import PackageExistsError, SourceError
from layerline.progress import byte_progress, step_progress

from .architectures import LAYER_PREFIX
from .gguf_blocks import HeldTensor
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
from .weights import WeightFormat, encode_held, encode_tensors, exact_quantization, parse_format

EMBED_FILE = "shared/embed.safetensors"
HEAD_FILE = "shared/head.safetensors"


def layer_file(index: int) -> str:
    return f"layers/{index:05d}.safetensors"


@dataclass
class BuildOptions:
    quantize: str | None = None  # None: "exact" for a GGUF source, "4bit" for any other
    group_size: int = 32
    fidelity: bool = True  # measure logits against the source in f32 (needs the model's f32 size)
    force: bool = False
    model_id: str | None = None
    drafts: list[DraftSpec] = field(default_factory=list)
    default_strategy: str | None = None
    quiet: bool = False


def build_package(source: str, output: Path | str, options: BuildOptions | None = None) -> Manifest:
    """Convert SOURCE into a layer package at `output`; nothing is left at `output` on failure."""
    options = options or BuildOptions()
    if options.quantize is not None:  # a bad format fails before the source is opened
        parse_format(options.quantize, options.group_size)
    output = Path(output).expanduser()
    if output.exists() and not options.force:
        raise PackageExistsError(
            f"{output} already exists", hint="choose another -o folder, or pass --force to replace it"
        )
    model = open_source(source)
    fmt = parse_format(options.quantize or ("exact" if model.holds_quantized_blocks else "4bit"),
                       options.group_size)
    if fmt.exact and not model.holds_quantized_blocks:
        raise SourceError(
            f"{model.source_name} is a {model.kind} source, which holds no quantized blocks to keep",
            hint="--quantize exact applies to GGUF sources; choose 4bit, 8bit, f16, bf16 or f32",
        )
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
    held: dict[str, HeldTensor] = {}  # exact builds: packed tensors by model path
    float_dtypes: set[str] = set()  # exact builds: dtypes of the matrices kept as floats

    def write(rel: str, tensors: dict, prefix: str = "") -> None:
        import mlx.core as mx

        if fmt.exact:
            arrays, packed = encode_held(tensors)
            held.update({prefix + base: tensor for base, tensor in packed.items()})
            float_dtypes.update(str(a.dtype).removeprefix("mlx.core.") for n, a in arrays.items()
                                if a.ndim == 2 and n.removesuffix(".weight") not in packed)
        else:
            arrays = encode_tensors(tensors, fmt)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
        written[rel] = FileEntry(rel, sha256_file(path), path.stat().st_size)

    blocks = model.quantized_blocks(fmt.group_size) if fmt.exact else nullcontext()
    with blocks, step_progress("converting layers", model.num_layers + 2, quiet=quiet) as advance:
        write(EMBED_FILE, model.embed_tensors())
        advance()
        for index in range(model.num_layers):
            write(layer_file(index), model.layer_tensors(index), f"{LAYER_PREFIX}{index}.")
            advance()
        write(HEAD_FILE, model.head_tensors())
        advance()
    quantization, dtype = fmt.quantization, fmt.dtype
    if fmt.exact:
        quantization = exact_quantization(held)
        if quantization is None and float_dtypes == {"float32"}:
            dtype = "float32"  # an F32 GGUF stays f32

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
        dtype=dtype,
        quantization=quantization,
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
    if options.fidelity:
        from .fidelity import measure_fidelity

        manifest = replace(manifest, fidelity=measure_fidelity(root, manifest, model, tokenizer, quiet=quiet))
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
