"""`layerline pkg inspect`: what a package holds, as a dict and as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .manifest import speculative_to_json
from .package import LayerPackage
from .window_spec import WindowSpec


def inspect_package(root: Path | str) -> dict[str, Any]:
    """A summary of a package: model, layers, sizes, quantization, tokenizer, speculation."""
    manifest = LayerPackage.open(root).manifest
    sizes = {f.path: f.bytes for f in manifest.files}
    layer_bytes = [sizes[p] for _, p in sorted(manifest.layers.items())]
    quant = manifest.quantization
    return {
        "package": str(root),
        "model_id": manifest.model.id,
        "architecture": manifest.model.architecture,
        "source": {
            "kind": manifest.model.source.kind,
            "file_name": manifest.model.source.file_name,
            "sha256": manifest.model.source.sha256,
            "bytes": manifest.model.source.bytes,
        },
        "layers": manifest.num_layers,
        "hidden_size": manifest.config.get("hidden_size"),
        "context_length": manifest.config.get("max_position_embeddings"),
        "weights": (f"{quant.bits}-bit affine, group {quant.group_size}" if quant else manifest.dtype),
        "quantization": None if quant is None else {
            "mode": quant.mode, "bits": quant.bits, "group_size": quant.group_size},
        "dtype": manifest.dtype,
        "bytes": {
            "total": sum(sizes.values()),
            "layers": sum(layer_bytes),
            "per_layer": layer_bytes[0] if layer_bytes else 0,
            "embed": sizes[manifest.shared["embed"]],
            "head": sizes[manifest.shared["head"]],
        },
        "files": len(manifest.files),
        "tokenizer": {
            "vocab_size": manifest.tokenizer.vocab_size,
            "bos_token_id": manifest.tokenizer.bos_token_id,
            "eos_token_id": manifest.tokenizer.eos_token_id,
            "chat_template": manifest.tokenizer.chat_template is not None,
            "fingerprint": manifest.tokenizer.fingerprint,
        },
        "speculative_decoding": (
            speculative_to_json(manifest.speculative_decoding)
            if manifest.speculative_decoding
            else None
        ),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render_summary(summary: dict[str, Any], console: Console) -> None:
    """Print an inspect summary as a table."""
    table = Table(title=summary["package"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    source = summary["source"]
    b = summary["bytes"]
    tok = summary["tokenizer"]
    rows = [
        ("model", summary["model_id"]),
        ("architecture", summary["architecture"]),
        ("source", f"{source['kind']} {source['file_name']} ({_mib(source['bytes'])})"),
        ("source sha256", source["sha256"]),
        ("layers", f"{summary['layers']} × {_mib(b['per_layer'])}"),
        ("hidden size", str(summary["hidden_size"])),
        ("context length", str(summary["context_length"])),
        ("weights", summary["weights"]),
        ("size", f"{_mib(b['total'])} (layers {_mib(b['layers'])}, embed {_mib(b['embed'])}, "
                 f"head {_mib(b['head'])})"),
        ("tokenizer", f"{tok['vocab_size']} tokens, bos={tok['bos_token_id']} "
                      f"eos={tok['eos_token_id']}, chat template "
                      f"{'yes' if tok['chat_template'] else 'no'}"),
        ("fingerprint", tok["fingerprint"]),
    ]
    spec = summary["speculative_decoding"]
    if spec is None:
        rows.append(("speculative", "none declared"))
    else:
        rows.append(("speculative default", str(spec["default"])))
        for name, strategy in spec["strategies"].items():
            window = WindowSpec.from_json(strategy).describe()
            rows.append((f"  strategy {name}",
                         f"{strategy['type']} {strategy.get('draft_model', '')} {window}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
