"""model-package.json: typed, parsed and validated in one place.

Everything downstream receives these dataclasses, never the raw dict.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from layerline.atomic_write import write_atomic
from layerline.errors import ManifestError

from .digest import is_sha256
from .window_spec import FIELDS, WindowError, WindowSpec

FORMAT = "layerline.layer-package"
# Version 3 lets tensors differ from the package's quantization (`quantization.tensors`, as
# exact GGUF builds write) and records `fidelity`; a reader of version 2 would load such a
# package with the wrong bits. Version 2 names a strategy's window as the config does
# (`window_policy = "adaptive"`, `initial_window`, …); version 1 nested them.
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "model-package.json"

STRATEGY_TYPES = ("draft-model", "ngram")


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SourceInfo:
    kind: str  # "gguf" | "safetensors" | "hub"
    file_name: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelInfo:
    id: str
    architecture: str
    source: SourceInfo


@dataclass(frozen=True)
class TensorFormat:
    """The affine format of one packed tensor."""

    bits: int
    group_size: int


@dataclass(frozen=True)
class HeldType:
    """How a package holds the tensors of one GGUF quantization type."""

    tensors: int
    bits: int
    group_size: int
    held_as: str  # "exact" | "scales rounded to f16" | "re-quantized"


@dataclass(frozen=True)
class Quantization:
    mode: str  # mlx's "affine"
    bits: int  # of every packed tensor not named in `tensors`
    group_size: int
    # Packed tensors in another format, by model path ("model.layers.3.mlp.down_proj", "lm_head").
    tensors: dict[str, TensorFormat] = field(default_factory=dict)
    gguf_types: dict[str, HeldType] = field(default_factory=dict)  # "Q4_K" -> how it is held

    def format_of(self, path: str) -> TensorFormat:
        """The format of the packed tensor at model path `path` (without `.weight`)."""
        return self.tensors.get(path) or TensorFormat(self.bits, self.group_size)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mode": self.mode, "bits": self.bits, "group_size": self.group_size}
        if self.tensors:
            data["tensors"] = {k: asdict(v) for k, v in sorted(self.tensors.items())}
        if self.gguf_types:
            data["gguf_types"] = {k: asdict(v) for k, v in sorted(self.gguf_types.items())}
        return data


@dataclass(frozen=True)
class Fidelity:
    """How close the package's logits are to its source's, measured when it was built."""

    reference: str  # what the logits were compared with, e.g. "source dequantized to float32"
    text_tokens: int
    mean_kl: float  # KL(reference || package) per position, nats
    top1_agreement: float  # share of positions whose argmax agrees


@dataclass(frozen=True)
class TokenizerInfo:
    files: list[str]
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int
    fingerprint: str  # "sha256:<hex>" over vocabulary, merges and added tokens


@dataclass(frozen=True)
class Calibration:
    """How well a strategy's drafter predicts the target, measured by `pkg calibrate`.

    Teacher-forced on the target's own greedy continuation of layerline's fixed prompts: at
    each position, the rank of the target's token among the drafter's candidates.
    """

    prompt_sets: tuple[str, ...]  # which of the shipped sets were measured: "code", "prose", "chat"
    prompts: int
    positions: int  # continuation tokens measured, over all prompts
    max_tokens: int  # the continuation's length per prompt (less where the target ended it)
    acceptance_by_rank: tuple[float, ...]  # [r-1]: P(the target's token is the draft's rank-r token)
    acceptance_top_r: tuple[float, ...]  # [r-1]: P(the target's token is among the draft's top r)
    acceptance_by_depth: tuple[float, ...]  # [d-1]: P(depth d of a chain is accepted | depth d-1 was)

    def to_json(self) -> dict[str, Any]:
        return {"prompt_sets": list(self.prompt_sets), "prompts": self.prompts,
                "positions": self.positions, "max_tokens": self.max_tokens,
                "acceptance_by_rank": list(self.acceptance_by_rank),
                "acceptance_top_r": list(self.acceptance_top_r),
                "acceptance_by_depth": list(self.acceptance_by_depth)}


@dataclass(frozen=True)
class Strategy:
    type: str
    draft_model: str | None = None
    tokenizer_fingerprint: str | None = None
    window_spec: WindowSpec = field(default_factory=WindowSpec)
    calibration: Calibration | None = None  # None until `pkg calibrate` measures the drafter


@dataclass(frozen=True)
class SpeculativeDecoding:
    default: str | None
    strategies: dict[str, Strategy]


@dataclass(frozen=True)
class Manifest:
    format: str
    schema_version: int
    model: ModelInfo
    config: dict[str, Any]  # mlx-lm ModelArgs, num_hidden_layers = the whole model
    dtype: str  # float dtype of unquantized tensors: float32 | float16 | bfloat16
    quantization: Quantization | None
    tokenizer: TokenizerInfo
    files: list[FileEntry]
    layers: dict[int, str]
    shared: dict[str, str]  # "embed" and "head" -> file
    speculative_decoding: SpeculativeDecoding | None = None
    fidelity: Fidelity | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def file(self, path: str) -> FileEntry:
        """The entry of one file, by its package-relative path."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise ManifestError(f"{MANIFEST_NAME} lists no file {path!r}")

    def layer_files(self, start: int, end: int) -> list[str]:
        """Files holding layers [start, end)."""
        if not (0 <= start < end <= self.num_layers):
            raise ManifestError(
                f"layer range {start}:{end} is outside the model's {self.num_layers} layers",
                hint=f"choose 0 <= start < end <= {self.num_layers}",
            )
        return [self.layers[i] for i in range(start, end)]

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to disk."""
        data: dict[str, Any] = {
            "format": self.format,
            "schema_version": SCHEMA_VERSION,  # what to_json writes, whatever version was read
            "model": asdict(self.model),
            "config": self.config,
            "dtype": self.dtype,
            "quantization": self.quantization.to_json() if self.quantization else None,
            "tokenizer": asdict(self.tokenizer),
            "files": [asdict(f) for f in self.files],
            "layers": {str(i): p for i, p in sorted(self.layers.items())},
            "shared": dict(self.shared),
        }
        if self.fidelity is not None:
            data["fidelity"] = asdict(self.fidelity)
        if self.speculative_decoding is not None:
            data["generation"] = {"speculative_decoding": speculative_to_json(self.speculative_decoding)}
        return data


def speculative_to_json(spec: SpeculativeDecoding) -> dict[str, Any]:
    strategies = {}
    for name, strategy in spec.strategies.items():
        entry: dict[str, Any] = {"type": strategy.type}
        if strategy.draft_model is not None:
            entry["draft_model"] = strategy.draft_model
        if strategy.tokenizer_fingerprint is not None:
            entry["tokenizer_fingerprint"] = strategy.tokenizer_fingerprint
        entry |= strategy.window_spec.to_json()
        if strategy.calibration is not None:
            entry["calibration"] = strategy.calibration.to_json()
        strategies[name] = entry
    return {"default": spec.default, "strategies": strategies}


# ---------------------------------------------------------------- parsing


REBUILD_HINT = "rebuild the package with `layerline pkg build`, or fix the manifest by hand"
RECALIBRATE_HINT = "measure it again with `layerline pkg calibrate PACKAGE`"


class _Reader:
    """Walks a raw dict, naming the field path in every error."""

    def __init__(self, data: Any, where: str, origin: str, hint: str = REBUILD_HINT) -> None:
        if not isinstance(data, dict):
            raise ManifestError(f"{origin}: {where or 'manifest'} must be an object", hint=hint)
        self.data, self.where, self.origin, self.hint = data, where, origin, hint

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str) -> ManifestError:
        """The error for field `key`, named by its path."""
        return ManifestError(f"{self.origin}: field {self._name(key)!r} {problem}", hint=self.hint)

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise self.fail(key, "is missing")
        value = self.data[key]
        if value is None and optional:
            return None
        # bool is an int in Python; a manifest that says true for a count is wrong.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"must be {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise self.fail(key, f"must be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def child(self, key: str, *, optional: bool = False, hint: str | None = None) -> _Reader | None:
        """The object at `key` (None if optional and absent); `hint` replaces the fix its errors name."""
        value = self.get(key, dict, optional=optional)
        return None if value is None else _Reader(value, self._name(key), self.origin, hint or self.hint)


def _sha256(reader: _Reader) -> str:
    """A `sha256` field: 64 lowercase hex digits (a file is stored and fetched by it)."""
    value = reader.get("sha256", str)
    if not is_sha256(value):
        raise reader.fail("sha256", f"must be 64 lowercase hex digits, got {value[:80]!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", dict: "an object",
             list: "a list", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_relative_path(path: str, origin: str) -> str:
    """A manifest path must stay inside the package: relative, no '..', no backslashes."""
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or "\\" in path
        or ".." in pure.parts
        or (len(path) > 1 and path[1] == ":")
    ):
        raise ManifestError(
            f"{origin}: unsafe path {path!r}: package paths must be relative and stay inside the "
            "package (no absolute paths, no '..')",
            hint="do not use this package; rebuild it from its source with `layerline pkg build`",
        )
    return path


def _parse_window(strategy: _Reader, schema_version: int) -> WindowSpec:
    """A strategy's window: flat settings (version 2), or the nested `window_policy` of version 1."""
    reader: _Reader | None = strategy
    names = dict(FIELDS)
    if schema_version == 1:
        reader = strategy.child("window_policy", optional=True)
        names["policy"] = "default"
    values = {}
    for field_name, name in names.items():
        value = None if reader is None else reader.get(name, str if field_name == "policy" else int,
                                                       optional=True)
        if value is not None:
            values[FIELDS[field_name]] = value
    try:
        return WindowSpec.from_json(values).validate()
    except WindowError as exc:
        raise ManifestError(f"{strategy.origin}: {strategy.where}: {exc.message}", hint=exc.hint) from exc


# Model dimensions a manifest may declare: each a whole number in [1, most]. The bounds are far
# above any real model's and keep a hostile manifest from allocating absurd arrays.
CONFIG_LIMITS = {
    "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
    "vocab_size": 1 << 23, "max_position_embeddings": 1 << 24,
}
REQUIRED_CONFIG = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _check_config(config: dict[str, Any], origin: str) -> None:
    """Raise ManifestError naming the first missing, ill-typed or out-of-range model dimension."""
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise ManifestError(f"{origin}: field 'config.{key}' is missing",
                                hint="rebuild the package with `layerline pkg build`")
    for key, most in CONFIG_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ManifestError(f"{origin}: field 'config.{key}' must be a whole number from 1 to {most}, "
                                f"got {value!r}", hint="rebuild the package with `layerline pkg build`")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    if kv_heads is not None and heads % kv_heads:
        raise ManifestError(f"{origin}: config.num_attention_heads {heads} is not a multiple of "
                            f"config.num_key_value_heads {kv_heads}")
    if "head_dim" not in config and config["hidden_size"] % heads:
        raise ManifestError(f"{origin}: config.hidden_size {config['hidden_size']} is not a multiple of "
                            f"config.num_attention_heads {heads}")


MAX_CALIBRATION_FIGURES = 64  # ranks or depths a calibration may list


def _parse_calibration(reader: _Reader | None) -> Calibration | None:
    """A strategy's `calibration`, each figure a probability; None where the strategy has none."""
    if reader is None:
        return None

    def count(key: str) -> int:
        value = reader.get(key, int)
        if value < 0:
            raise reader.fail(key, f"must not be negative, got {value}")
        return value

    def figures(key: str) -> tuple[float, ...]:
        values = reader.get(key, list)
        if not 1 <= len(values) <= MAX_CALIBRATION_FIGURES or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in values):
            raise reader.fail(key, f"must list 1 to {MAX_CALIBRATION_FIGURES} probabilities in [0, 1], "
                                   f"got {values!r}")
        return tuple(float(v) for v in values)

    sets = reader.get("prompt_sets", list)
    if not all(isinstance(name, str) for name in sets):
        raise reader.fail("prompt_sets", f"must list names, got {sets!r}")
    calibration = Calibration(
        prompt_sets=tuple(sets), prompts=count("prompts"), positions=count("positions"),
        max_tokens=count("max_tokens"), acceptance_by_rank=figures("acceptance_by_rank"),
        acceptance_top_r=figures("acceptance_top_r"), acceptance_by_depth=figures("acceptance_by_depth"))
    if len(calibration.acceptance_top_r) != len(calibration.acceptance_by_rank):
        raise reader.fail("acceptance_top_r", "must list as many ranks as acceptance_by_rank")
    return calibration


def parse_speculative(raw: Any, origin: str, schema_version: int = SCHEMA_VERSION) -> SpeculativeDecoding:
    reader = _Reader(raw, "generation.speculative_decoding", origin)
    strategies_reader = reader.child("strategies")
    assert strategies_reader is not None
    strategies: dict[str, Strategy] = {}
    for name in strategies_reader.data:
        s = strategies_reader.child(name)
        assert s is not None
        kind = s.get("type", str)
        if kind not in STRATEGY_TYPES:
            raise ManifestError(
                f"{origin}: strategy {name!r} has unknown type {kind!r}; known: {STRATEGY_TYPES}"
            )
        draft = s.get("draft_model", str, optional=kind != "draft-model")
        strategies[name] = Strategy(
            type=kind,
            draft_model=draft,
            tokenizer_fingerprint=s.get("tokenizer_fingerprint", str, optional=True),
            window_spec=_parse_window(s, schema_version),
            calibration=_parse_calibration(s.child("calibration", optional=True, hint=RECALIBRATE_HINT)),
        )
    default = reader.get("default", str, optional=True)
    if default is not None and default not in strategies:
        raise ManifestError(
            f"{origin}: generation.speculative_decoding.default names {default!r}, "
            f"which is not among the strategies {sorted(strategies)}"
        )
    return SpeculativeDecoding(default=default, strategies=strategies)


def parse_manifest(raw: Any, origin: str = MANIFEST_NAME) -> Manifest:
    """Validate a raw manifest dict and return it typed; raise ManifestError naming the field."""
    top = _Reader(raw, "", origin)
    fmt = top.get("format", str)
    if fmt != FORMAT:
        raise ManifestError(f"{origin}: format is {fmt!r}, expected {FORMAT!r}")
    version = top.get("schema_version", int)
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ManifestError(
            f"{origin}: unknown schema_version {version}; this layerline reads versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}",
            hint="upgrade layerline, or rebuild the package with this version",
        )

    model = top.child("model")
    source = model.child("source")  # type: ignore[union-attr]
    assert model is not None and source is not None
    model_info = ModelInfo(
        id=model.get("id", str),
        architecture=model.get("architecture", str),
        source=SourceInfo(
            kind=source.get("kind", str),
            file_name=source.get("file_name", str),
            sha256=_sha256(source),
            bytes=source.get("bytes", int),
        ),
    )

    config = top.get("config", dict)
    _check_config(config, origin)
    dtype = top.get("dtype", str)
    quant_reader = top.child("quantization", optional=True)
    quantization = None if quant_reader is None else _parse_quantization(quant_reader)
    fidelity_reader = top.child("fidelity", optional=True)
    fidelity = None
    if fidelity_reader is not None:
        fidelity = Fidelity(
            reference=fidelity_reader.get("reference", str),
            text_tokens=fidelity_reader.get("text_tokens", int),
            mean_kl=float(fidelity_reader.get("mean_kl", (int, float))),
            top1_agreement=float(fidelity_reader.get("top1_agreement", (int, float))),
        )

    tok = top.child("tokenizer")
    assert tok is not None
    tokenizer = TokenizerInfo(
        files=[check_relative_path(p, origin) for p in tok.get("files", list)],
        chat_template=tok.get("chat_template", str, optional=True),
        bos_token_id=tok.get("bos_token_id", int, optional=True),
        eos_token_id=tok.get("eos_token_id", int, optional=True),
        vocab_size=tok.get("vocab_size", int),
        fingerprint=tok.get("fingerprint", str),
    )

    files = []
    for i, entry in enumerate(top.get("files", list)):
        f = _Reader(entry, f"files[{i}]", origin)
        files.append(
            FileEntry(
                path=check_relative_path(f.get("path", str), origin),
                sha256=_sha256(f),
                bytes=f.get("bytes", int),
            )
        )
    listed = {f.path for f in files}

    layers_raw = top.get("layers", dict)
    layers: dict[int, str] = {}
    for key, path in layers_raw.items():
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(path, str):
            raise ManifestError(f"{origin}: layers must map layer indices to file paths")
        layers[int(key)] = check_relative_path(path, origin)
    if sorted(layers) != list(range(len(layers))):
        raise ManifestError(f"{origin}: layers must be numbered 0..N-1 without gaps")
    if len(layers) != config["num_hidden_layers"]:
        raise ManifestError(
            f"{origin}: config.num_hidden_layers is {config['num_hidden_layers']} but 'layers' lists "
            f"{len(layers)} layer files", hint="rebuild the package with `layerline pkg build`: a package "
            "holds every layer of its model, each in a file of its own")
    shared_raw = top.get("shared", dict)
    shared = {name: check_relative_path(p, origin) for name, p in shared_raw.items()}
    for needed in ("embed", "head"):
        if needed not in shared:
            raise ManifestError(f"{origin}: field 'shared.{needed}' is missing")

    for path in [*layers.values(), *shared.values(), *tokenizer.files]:
        if path not in listed:
            raise ManifestError(f"{origin}: {path!r} is used but not listed in files")

    speculative = None
    generation = top.child("generation", optional=True)
    if generation is not None and generation.data.get("speculative_decoding") is not None:
        speculative = parse_speculative(generation.data["speculative_decoding"], origin, version)

    return Manifest(
        format=fmt,
        schema_version=version,
        model=model_info,
        config=config,
        dtype=dtype,
        quantization=quantization,
        tokenizer=tokenizer,
        files=files,
        layers=layers,
        shared=shared,
        speculative_decoding=speculative,
        fidelity=fidelity,
    )


def _parse_quantization(reader: _Reader) -> Quantization:
    tensors: dict[str, TensorFormat] = {}
    tensors_reader = reader.child("tensors", optional=True)
    for path in [] if tensors_reader is None else tensors_reader.data:
        entry = tensors_reader.child(path)  # type: ignore[union-attr]
        assert entry is not None
        tensors[path] = TensorFormat(bits=entry.get("bits", int), group_size=entry.get("group_size", int))
    gguf_types: dict[str, HeldType] = {}
    types_reader = reader.child("gguf_types", optional=True)
    for name in [] if types_reader is None else types_reader.data:
        entry = types_reader.child(name)  # type: ignore[union-attr]
        assert entry is not None
        gguf_types[name] = HeldType(tensors=entry.get("tensors", int), bits=entry.get("bits", int),
                                    group_size=entry.get("group_size", int),
                                    held_as=entry.get("held_as", str))
    return Quantization(
        mode=reader.get("mode", str),
        bits=reader.get("bits", int),
        group_size=reader.get("group_size", int),
        tensors=tensors,
        gguf_types=gguf_types,
    )


def read_manifest(package_dir: Path) -> Manifest:
    """Read and validate `<package_dir>/model-package.json`."""
    path = Path(package_dir) / MANIFEST_NAME
    if not Path(package_dir).is_dir():
        raise ManifestError(
            f"package folder {package_dir} does not exist",
            hint="pass the folder that `layerline pkg build -o` wrote",
        )
    if not path.is_file():
        raise ManifestError(
            f"{package_dir} has no {MANIFEST_NAME}; it is not a layer package",
            hint="build one with `layerline pkg build SOURCE -o OUT`",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ManifestError(f"{path} nests JSON too deeply to be a manifest",
                            hint="rebuild the package with `layerline pkg build`") from exc
    return parse_manifest(raw, str(path))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON as a manifest is written (indented, UTF-8, a final newline), whole or not at all."""
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
