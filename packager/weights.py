"""Weight formats of a package, and turning source tensors into mlx-native tensors of one."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from layerline.errors import LayerlineError

from .gguf_blocks import HeldTensor
from .manifest import HeldType, Quantization, TensorFormat

# `exact` keeps a GGUF's quantized blocks where mlx's affine format holds them (gguf_blocks.py).
FORMATS = ("exact", "4bit", "8bit", "f16", "bf16", "f32")
GROUP_SIZES = (32, 64, 128)
_FLOAT_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}


@dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: int | None
    group_size: int
    dtype: str  # float dtype of everything not quantized (norms, biases, scales)

    @property
    def exact(self) -> bool:
        """Whether tensors keep their source's own format (per tensor) instead of this one."""
        return self.name == "exact"

    @property
    def quantization(self) -> Quantization | None:
        if self.bits is None:
            return None
        return Quantization(mode="affine", bits=self.bits, group_size=self.group_size)


def parse_format(name: str, group_size: int = 32) -> WeightFormat:
    """The weight format called `name` (exact, 4bit, 8bit, f16, bf16, f32)."""
    if name not in FORMATS:
        raise LayerlineError(f"unknown weight format {name!r}; choose one of {', '.join(FORMATS)}")
    if name in ("exact", "4bit", "8bit"):
        if group_size not in GROUP_SIZES:
            raise LayerlineError(
                f"group size {group_size} is not supported by mlx; choose one of {GROUP_SIZES}"
            )
        # Scales and unquantized tensors stay in f16, as mlx-lm's own conversions keep them
        # (exact: a GGUF's f16 block scales; its float tensors keep their own dtype).
        bits = None if name == "exact" else int(name[0])
        return WeightFormat(name=name, bits=bits, group_size=group_size, dtype="float16")
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


def encode_held(tensors: dict[str, np.ndarray | HeldTensor]) -> tuple[dict, dict[str, HeldTensor]]:
    """Tensors of an exact build -> mlx arrays as they are (packed ones with their scales and
    biases, floats in their own dtype), and the packed ones by base name (`mlp.down_proj`)."""
    import mlx.core as mx

    out: dict[str, mx.array] = {}
    held: dict[str, HeldTensor] = {}
    for name, value in tensors.items():
        if isinstance(value, HeldTensor):
            base = name.removesuffix(".weight")
            out[f"{base}.weight"] = mx.array(value.packed)
            out[f"{base}.scales"] = mx.array(value.scales)
            out[f"{base}.biases"] = mx.array(value.biases)
            held[base] = value
        else:
            out[name] = mx.array(value)
    mx.eval(out)
    return out, held



def exact_quantization(held: dict[str, HeldTensor]) -> Quantization | None:
    """The quantization of an exact build: its commonest format, the tensors in another, and how
    each GGUF type is held. None if nothing is packed (a float GGUF)."""
    if not held:
        return None
    formats = Counter(TensorFormat(t.bits, t.group_size) for t in held.values())
    common = formats.most_common(1)[0][0]
    types: dict[str, HeldType] = {}
    for tensor in held.values():
        seen = types.get(tensor.gguf_type)
        types[tensor.gguf_type] = HeldType(tensors=1 + (seen.tensors if seen else 0), bits=tensor.bits,
                                           group_size=tensor.group_size, held_as=tensor.held_as)
    return Quantization(
        mode="affine", bits=common.bits, group_size=common.group_size,
        tensors={path: TensorFormat(t.bits, t.group_size) for path, t in held.items()
                 if TensorFormat(t.bits, t.group_size) != common},
        gguf_types=types,
    )
