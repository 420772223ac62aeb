"""Weight formats of a package, and turning float tensors into mlx-native tensors of one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from layerline.errors import LayerlineError

from .manifest import Quantization

FORMATS = ("4bit", "8bit", "f16", "bf16", "f32")
GROUP_SIZES = (32, 64, 128)
_FLOAT_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int | None
    group_size: int
    dtype: str  # float dtype of everything not quantized (norms, biases, scales)

    @property
    def quantization(self) -> Quantization | None:
        if self.bits is None:
            return None
        return Quantization(mode="affine", bits=self.bits, group_size=self.group_size)


def parse_format(name: str, group_size: int = 32) -> WeightFormat:
    """The weight format called `name` (4bit, 8bit, f16, bf16, f32)."""
    if name not in FORMATS:
        raise LayerlineError(f"unknown weight format {name!r}; choose one of {', '.join(FORMATS)}")
    if name in ("4bit", "8bit"):
        if group_size not in GROUP_SIZES:
            raise LayerlineError(
                f"group size {group_size} is not supported by mlx; choose one of {GROUP_SIZES}"
            )
        # Scales and unquantized tensors stay in f16, as mlx-lm's own conversions keep them.
        return WeightFormat(name=name, bits=int(name[0]), group_size=group_size, dtype="float16")
    return WeightFormat(name=name, bits=None, group_size=group_size, dtype=_FLOAT_DTYPES[name])


def is_quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Linear and embedding matrices (and a mixture's stacked expert matrices) whose rows split
    into whole groups, as mlx-lm quantizes."""
    return name.endswith(".weight") and len(shape) in (2, 3) and shape[-1] % group_size == 0


def encode_tensors(tensors: dict[str, np.ndarray], fmt: WeightFormat) -> dict:
    """Float32 tensors -> mlx arrays in `fmt` (`.weight` + `.scales` + `.biases` if quantized)."""
    import mlx.core as mx

    dtype = getattr(mx, fmt.dtype)
    out: dict[str, mx.array] = {}
    for name, values in tensors.items():
        array = mx.array(values).astype(dtype)
        if fmt.bits is not None and is_quantizable(name, values.shape, fmt.group_size):
            packed, scales, biases = mx.quantize(array, group_size=fmt.group_size, bits=fmt.bits)
            base = name[: -len(".weight")]
            out[f"{base}.weight"] = packed
            out[f"{base}.scales"] = scales
            out[f"{base}.biases"] = biases
        else:
            out[name] = array
    mx.eval(out)
    return out
