"""GGUF quantized blocks held in mlx's affine format (w = scale·q + bias per group), without re-quantizing.

mlx packs a row's b-bit values as one little-endian bit stream in uint32 words (value i at
bits [b·i, b·i + b)), with one scale and one bias per group of `group_size` values along the
row. GGUF's legacy blocks are already that shape:

- Q4_0 (w = d·(q − 8)) is 4-bit/32 with scale d and bias −8d; Q5_0 is 5-bit/32 with bias −16d;
  Q8_0 (w = d·q, q signed) is 8-bit/32 with q + 128 and bias −128d.
- Q4_1 and Q5_1 (w = d·q + m) are 4- and 5-bit/32 with scale d and bias m.

d and m are f16 in the GGUF, so f16 scales and biases hold them exactly (the products with
powers of two too, short of overflow), and scale·q + bias in f32 equals GGUF's dequantization.

- Q4_K and Q5_K (w = d·sc_j·q − dmin·m_j over sub-blocks of 32) are 4- and 5-bit/32 with scale
  d·sc_j and bias −dmin·m_j; those products need more than f16's 11 bits, so rounding them to
  f16 is their only loss.

Every other type (Q6_K and Q2_K/Q3_K have 16-value sub-blocks, which mlx's groups of 32+ cannot
hold; the IQ types use non-linear grids) is dequantized by gguf and re-quantized by mlx with the
fewest bits of 4, 5, 8 that are not fewer than the type spends per weight. Float tensors stay
floats: F32 and F16 as they are, BF16 as f32 (numpy has no bfloat16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerline.errors import SourceError

GROUP = 32  # every held GGUF type has one scale per 32 values
REQUANTIZE_BITS = (4, 5, 8)  # what the CPU kernel and mlx's own kernels handle
EXACT = "exact"
SCALES_ROUNDED = "scales rounded to f16"
REQUANTIZED = "re-quantized"


@dataclass(frozen=True)
class HeldTensor:
    """One weight matrix in mlx's affine format, and how faithfully it holds its GGUF tensor."""

    packed: np.ndarray  # uint32 (rows, cols·bits/32)
    scales: np.ndarray  # f16 or f32 (rows, cols/group_size)
    biases: np.ndarray  # same dtype and shape as scales
    bits: int
    group_size: int
    gguf_type: str  # "Q4_K", …
    held_as: str  # EXACT | SCALES_ROUNDED | REQUANTIZED

    @property
    def shape(self) -> tuple[int, ...]:
        *rows, words = self.packed.shape
        return *rows, words * 32 // self.bits

    def stacked(self, shape: tuple[int, ...]) -> HeldTensor:
        """The same rows as a stack of matrices (a mixture's experts: (experts, rows, cols))."""
        lead = shape[:-1]
        return HeldTensor(self.packed.reshape(*lead, -1), self.scales.reshape(*lead, -1),
                          self.biases.reshape(*lead, -1), self.bits, self.group_size, self.gguf_type,
                          self.held_as)

    def map_rows(self, permute: Callable[[np.ndarray], np.ndarray]) -> HeldTensor:
        """The same tensor with its rows reordered by `permute` (groups run along a row, so a
        row's scales and biases move with it)."""
        return HeldTensor(permute(self.packed), permute(self.scales), permute(self.biases), self.bits,
                          self.group_size, self.gguf_type, self.held_as)


def hold(tensor: Any, name: str, group_size: int = GROUP) -> HeldTensor | np.ndarray:
    """A GGUF tensor (gguf's ReaderTensor) as mlx will hold it: affine blocks, or a float array.

    Quantized types mlx cannot hold are re-quantized with groups of `group_size`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    kind = GGMLQuantizationType(tensor.tensor_type)
    cols, rows = int(tensor.shape[0]), int(np.prod(tensor.shape[1:], dtype=np.int64))
    if kind == GGMLQuantizationType.F32:
        return np.asarray(tensor.data, dtype=np.float32).reshape(_hf_shape(tensor))
    if kind == GGMLQuantizationType.F16:
        return np.asarray(tensor.data, dtype=np.float16).reshape(_hf_shape(tensor))
    block_size, block_bytes = GGML_QUANT_SIZES[kind]
    if cols % block_size:
        raise SourceError(f"tensor {name} ({kind.name}) has rows of {cols} values, not a multiple of "
                          f"its {block_size}-value blocks", hint="the GGUF file is corrupt")
    data = np.asarray(tensor.data).view(np.uint8)
    expected = rows * cols // block_size * block_bytes
    if data.size != expected:
        raise SourceError(f"tensor {name} ({kind.name}, {rows}x{cols}) holds {data.size} bytes, "
                          f"expected {expected}",
                          hint="the GGUF file is truncated or corrupt; download it again")
    blocks = data.reshape(rows, cols // block_size, block_bytes)
    convert = _HELD.get(kind.name)
    if convert is not None and len(tensor.shape) in (2, 3):  # a matrix, or a stack of experts'
        q, scales, biases, bits, held_as = convert(blocks)
        held = _pack_held(q.reshape(rows, cols), scales.reshape(rows, -1), biases.reshape(rows, -1),
                          bits, kind.name, held_as)
        return held.stacked(_hf_shape(tensor)) if len(tensor.shape) == 3 else held
    try:
        values = np.asarray(dequantize(data.reshape(rows, -1), kind), dtype=np.float32)
    except NotImplementedError as exc:
        raise SourceError(
            f"tensor {name} uses {kind.name}, which gguf cannot dequantize",
            hint="convert the model with a common quantization (Q4_K_M, Q8_0, F16 ...)",
        ) from exc
    if kind.name == "BF16" or len(tensor.shape) not in (2, 3):  # mlx packs matrices (and stacks)
        return values.reshape(_hf_shape(tensor))
    if cols % group_size:
        raise SourceError(f"tensor {name} ({kind.name}, shape {values.shape}) cannot be held in groups "
                          f"of {group_size}", hint="build with --quantize f16 or f32")
    bits = requantize_bits(block_bytes * 8 / block_size)
    return requantize(values.reshape(_hf_shape(tensor)), bits, group_size, kind.name)


def requantize_bits(bits_per_weight: float) -> int:
    """The fewest affine bits that are not fewer than a GGUF type spends per weight."""
    return next((b for b in REQUANTIZE_BITS if b >= bits_per_weight), REQUANTIZE_BITS[-1])


def requantize(values: np.ndarray, bits: int, group_size: int, gguf_type: str) -> HeldTensor:
    """Float values quantized by mlx (f16 scales), as a package's re-quantized formats are."""
    import mlx.core as mx

    array = mx.array(values).astype(mx.float16)
    packed, scales, biases = mx.quantize(array, group_size=group_size, bits=bits)
    return HeldTensor(np.array(packed), np.array(scales), np.array(biases), bits, group_size, gguf_type,
                      REQUANTIZED)


def _hf_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))


def _pack_held(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, gguf_type: str,
               held_as: str) -> HeldTensor:
    """Integer values, f32 scales and biases -> a HeldTensor with f16 scales where f16 holds them."""
    with np.errstate(over="ignore"):  # an overflow is found below, and handled
        scales16, biases16 = scales.astype(np.float16), biases.astype(np.float16)
    exact = held_as == EXACT
    fits = np.isfinite(scales16).all() and np.isfinite(biases16).all()
    if exact:  # f16 must give the same values back, else keep f32 (d near f16's top, say)
        fits = fits and np.array_equal(scales16, scales) and np.array_equal(biases16, biases)
    if fits:
        scales, biases = scales16, biases16
    return HeldTensor(pack(q, bits), scales, biases, bits, GROUP, gguf_type, held_as)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit values (rows, cols) -> mlx's packing: uint32 (rows, cols·bits/32)."""
    rows, cols = q.shape
    q = q.astype(np.uint64 if bits == 5 else np.uint32)
    if bits == 8:
        return np.ascontiguousarray(q.astype(np.uint8)).view(np.uint32)
    if bits == 4:
        eight = q.reshape(rows, cols // 8, 8) << (4 * np.arange(8, dtype=np.uint32))
        return np.bitwise_or.reduce(eight, axis=-1).astype(np.uint32)
    if bits == 5:  # eight 5-bit values fill 40 bits: five bytes of a little-endian uint64
        eight = q.reshape(rows, cols // 8, 8) << (5 * np.arange(8, dtype=np.uint64))
        words = np.bitwise_or.reduce(eight, axis=-1)
        five = words[..., None].view(np.uint8).reshape(rows, cols // 8, 8)[..., :5]
        return np.ascontiguousarray(five).reshape(rows, -1).view(np.uint32)
    raise ValueError(f"no packing for {bits}-bit values")


# ---------------------------------------------------------------- block layouts (ggml-common.h)
# Each converter takes blocks (rows, blocks_per_row, bytes) and returns the values q
# (unsigned, in row order), scale and bias per 32 values (f32), the bits and the fidelity.


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: low nibbles are values 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes, one bit per value (little-endian) -> 32 fifth bits."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _q4_0(blocks: np.ndarray) -> tuple:
    d = _f16(blocks[..., 0:2])
    return _nibbles(blocks[..., 2:18]), d, -8 * d, 4, EXACT


def _q4_1(blocks: np.ndarray) -> tuple:
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    return _nibbles(blocks[..., 4:20]), d, m, 4, EXACT


def _q5_0(blocks: np.ndarray) -> tuple:
    d = _f16(blocks[..., 0:2])
    q = _nibbles(blocks[..., 6:22]) | (_high_bits(blocks[..., 2:6]) << 4)
    return q, d, -16 * d, 5, EXACT


def _q5_1(blocks: np.ndarray) -> tuple:
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    q = _nibbles(blocks[..., 8:24]) | (_high_bits(blocks[..., 4:8]) << 4)
    return q, d, m, 5, EXACT


def _q8_0(blocks: np.ndarray) -> tuple:
    d = _f16(blocks[..., 0:2])
    q = blocks[..., 2:34].view(np.int8).astype(np.int16) + 128
    return q, d, -128 * d, 8, EXACT


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: d·sc_j and dmin·m_j (f32, exact) for the 8 sub-blocks of each 256 values."""
    from gguf.quants import Q4_K

    lead = blocks.shape[:-1]
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
    return d * sc.reshape(*lead, 8), dmin * m.reshape(*lead, 8)


def _q4_k(blocks: np.ndarray) -> tuple:
    scales, mins = _k_scales(blocks)
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)  # 4 chunks of 64 values
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2)  # chunk c: sub-blocks 2c (low) and 2c+1 (high)
    return q, scales, -mins, 4, SCALES_ROUNDED


def _q5_k(blocks: np.ndarray) -> tuple:
    scales, mins = _k_scales(blocks)
    lead = blocks.shape[:-1]
    qh = blocks[..., 16:48].reshape(*lead, 1, 32)
    qs = blocks[..., 48:176].reshape(*lead, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*lead, 8, 32)
    high = (qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1  # sub-block j: bit j of qh[l]
    return low | (high << 4), scales, -mins, 5, SCALES_ROUNDED


_HELD = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
         "Q4_K": _q4_k, "Q5_K": _q5_k}
HELD_TYPES = tuple(_HELD)
