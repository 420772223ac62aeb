"""Reading a package's tensors: verified first, then converted to the planned weight format.

A file can match its sha256 and still be wrong (a package built wrong, or by hand): its
safetensors header is read and bounded before mlx sees it, and a tensor missing, extra or
of the wrong shape is a PackageFileError naming the files, never a traceback.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from layerline.errors import ManifestError, PackageFileError
from layerline.packager.manifest import Quantization
from layerline.packager.package import LayerPackage

from .cpu_kernel import use_cpu_kernel
from .fused_ops import use_fused_ops

if TYPE_CHECKING:
    from .weights_policy import WeightsPlan


def read_verified(package: LayerPackage, files: list[str]) -> list[dict[str, mx.array]]:
    """The tensors of each file, after every one of them has matched its sha256."""
    # All files are checked before any is read: a bad file is refused before use, by name.
    package.verify(files)
    return [_load_safetensors(package.path(f), f) for f in files]


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def _load_safetensors(path: Path, name: str) -> dict[str, mx.array]:
    """The tensors of one safetensors file, or PackageFileError saying what is wrong with it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(8)
        length = struct.unpack("<Q", start)[0] if len(start) == 8 else None
        problem = None
        if length is None or length > min(MAX_HEADER_BYTES, size - 8):
            problem = f"its header claims {length} bytes of a {size}-byte file"
        else:
            try:
                header = json.loads(f.read(length))
                end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                          default=0)
                if 8 + length + end > size:
                    problem = f"it is truncated: its tensors end at byte {8 + length + end} of {size}"
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
                problem = f"its header is not safetensors JSON ({exc})"
    if problem is None:
        try:
            return mx.load(str(path))
        except (RuntimeError, ValueError) as exc:
            problem = str(exc)
    raise PackageFileError(f"cannot read the tensors of {name}: {problem}",
                           hint="rebuild the package with `layerline pkg build` (it matches its sha256, so "
                                "the manifest was written for this broken file)")


def apply_plan(
    tensors: dict[str, mx.array], plan: WeightsPlan, quantization: Quantization | None, prefix: str = ""
) -> dict[str, mx.array]:
    """The tensors in the plan's format: packed ones kept or expanded, floats in compute dtype.

    `prefix` makes a file's tensor names model paths (`model.layers.3.`), by which the manifest
    names tensors packed in a format of their own."""
    dtype = getattr(mx, plan.compute_dtype)
    out: dict[str, mx.array] = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")) and _packed_base(name) in tensors:
            continue  # handled with their weight
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is not None and f"{base}.scales" in tensors:
            if quantization is None:
                raise ManifestError(
                    f"tensor {name} is quantized but the manifest declares no quantization",
                    hint="rebuild the package with `layerline pkg build`",
                )
            scales = tensors[f"{base}.scales"]
            biases = tensors.get(f"{base}.biases")
            if plan.expands:
                # Dequantized with f32 scales, so f32 weights hold exactly the packed values.
                fmt = quantization.format_of(prefix + base)
                full = mx.dequantize(
                    value, scales.astype(mx.float32),
                    None if biases is None else biases.astype(mx.float32),
                    group_size=fmt.group_size, bits=fmt.bits, mode=quantization.mode,
                )
                out[name] = full.astype(dtype)
            else:
                out[name] = value
                out[f"{base}.scales"] = scales.astype(dtype)
                if biases is not None:
                    out[f"{base}.biases"] = biases.astype(dtype)
        elif mx.issubdtype(value.dtype, mx.floating):
            out[name] = value.astype(dtype)
        else:
            out[name] = value
    return out


def _packed_base(name: str) -> str:
    return name.rsplit(".", 1)[0] + ".weight"


def load_into(
    module: nn.Module, weights: dict[str, mx.array], quantization: Quantization | None,
    model_path: Callable[[str], str] = lambda path: path, *, cpu_kernel: bool = True,
    files: str = "the package's files",
) -> None:
    """Quantize the layers whose weights are packed, then load `weights` (all names must match).

    `model_path` turns a module path here into the model path the manifest names it by. On the
    CPU, packed layers then compute with layerline's kernel (`cpu_kernel.py`), and norms, RoPE
    and activations with its fused ops (`fused_ops.py`), unless `cpu_kernel` is False (a bare
    mlx-lm model for comparison).
    """
    if quantization is not None and any(k.endswith(".scales") for k in weights):

        def packed_format(path: str, _: nn.Module) -> dict | bool:
            # A tensor is packed exactly when its scales exist, as mlx-lm decides.
            if f"{path}.scales" not in weights:
                return False
            fmt = quantization.format_of(model_path(path))
            return {"group_size": fmt.group_size, "bits": fmt.bits, "mode": quantization.mode}

        nn.quantize(module, class_predicate=packed_format)
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:  # missing, extra or misshapen tensors: mlx names them
        raise PackageFileError(f"{files} do not hold the tensors the model config asks for: {exc}",
                               hint="rebuild the package with `layerline pkg build`; its config.json and "
                                    "its tensor files disagree") from exc
    mx.eval(module.parameters())
    if cpu_kernel:
        use_cpu_kernel(module)
        use_fused_ops(module)
