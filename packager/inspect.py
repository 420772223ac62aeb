"""`layerline pkg inspect`: what a package holds, as a dict and as a table."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .manifest import Calibration, Fidelity, Quantization, speculative_to_json
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
        "weights": describe_weights(quant) if quant else manifest.dtype,
        "quantization": None if quant is None else quant.to_json(),
        "fidelity": None if manifest.fidelity is None else asdict(manifest.fidelity),
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


def describe_weights(quant: Quantization) -> str:
    """`4-bit affine, group 32`, and how many tensors are packed otherwise."""
    text = f"{quant.bits}-bit affine, group {quant.group_size}"
    others: dict[str, int] = {}
    for fmt in quant.tensors.values():
        key = f"{fmt.bits}-bit/{fmt.group_size}"
        others[key] = others.get(key, 0) + 1
    extra = ", ".join(f"{_tensors(n)} {key}" for key, n in sorted(others.items()))
    return f"{text} ({extra})" if extra else text


def describe_fidelity(fidelity: Fidelity) -> str:
    """`mean KL 2.1e-05, top-1 agreement 98.4 % on 64 tokens (vs …)`."""
    return (f"mean KL {fidelity.mean_kl:.3g}, top-1 agreement {fidelity.top1_agreement:.1%} on "
            f"{fidelity.text_tokens} tokens (vs {fidelity.reference})")


def describe_calibration(calibration: Calibration) -> str:
    """`top-1 71.2 %, top-4 86.0 %; by depth 71 78 80 … %; 9 prompts (code, prose, chat), 432 positions`."""
    top = calibration.acceptance_top_r
    depths = " ".join(f"{p:.0%}".removesuffix("%") for p in calibration.acceptance_by_depth)
    return (f"top-1 {top[0]:.1%}, top-{len(top)} {top[-1]:.1%}; by depth {depths} %; "
            f"{calibration.prompts} prompts ({', '.join(calibration.prompt_sets)}), "
            f"{calibration.positions} positions")


def _tensors(n: int) -> str:
    return f"{n} tensor{'s' if n != 1 else ''}"


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
        *[(f"  from {name}", f"{_tensors(t['tensors'])} as {t['bits']}-bit/{t['group_size']}, {t['held_as']}")
          for name, t in ((summary["quantization"] or {}).get("gguf_types") or {}).items()],
        ("fidelity", "not measured" if summary["fidelity"] is None
         else describe_fidelity(Fidelity(**summary["fidelity"]))),
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
            calibration = strategy.get("calibration")
            rows.append(("    calibration", "not measured" if calibration is None
                         else describe_calibration(Calibration(**calibration))))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
