"""GGUF quantized blocks held in mlx's affine format: bit-exact where mlx holds them, within the
f16 rounding of their scales for K-quants, re-quantized otherwise; bad tensors named."""

from __future__ import annotations

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from layerline.errors import SourceError
from layerline.packager.gguf_blocks import (
    EXACT,
    REQUANTIZED,
    SCALES_ROUNDED,
    HeldTensor,
    hold,
    pack,
    requantize_bits,
)

ROWS, COLS = 48, 512


def gguf_tensor(tmp_path: Path, kind: GGMLQuantizationType, raw: np.ndarray):
    """`raw` (uint8 blocks, rows × bytes) written to a real GGUF file and read back by gguf."""
    path = tmp_path / f"{kind.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path)).tensors[0]


def mlx_values(held) -> np.ndarray:
    """What the runtime computes with: mlx's dequantization with f32 scales."""
    return np.array(mx.dequantize(mx.array(held.packed), mx.array(held.scales.astype(np.float32)),
                                  mx.array(held.biases.astype(np.float32)),
                                  group_size=held.group_size, bits=held.bits))


def weights(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Rows of very different magnitudes, as real layers have, so small and large scales occur.
    return (rng.normal(size=(ROWS, COLS)) * np.logspace(-4, 1, ROWS)[:, None]).astype(np.float32)


def random_k_blocks(kind: GGMLQuantizationType, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks (any bit pattern is a valid block) with sane f16 d and dmin."""
    rng = np.random.default_rng(seed)
    block_bytes = GGML_QUANT_SIZES[kind][1]
    blocks = rng.integers(0, 256, size=(ROWS, COLS // 256, block_bytes), dtype=np.uint8)
    d = (rng.random((ROWS, COLS // 256, 2)) * np.logspace(-5, -1, ROWS)[:, None, None]).astype(np.float16)
    offset = 208 if kind == GGMLQuantizationType.Q6_K else 0  # Q6_K keeps its d at the end
    blocks[..., offset:offset + (2 if offset else 4)] = d.view(np.uint8)[..., : 2 if offset else 4]
    return blocks.reshape(ROWS, -1)


@pytest.mark.parametrize("kind, bits", [("Q4_0", 4), ("Q4_1", 4), ("Q5_0", 5), ("Q5_1", 5), ("Q8_0", 8)])
def test_legacy_blocks_are_held_bit_exactly(tmp_path, kind, bits):
    qtype = GGMLQuantizationType[kind]
    tensor = gguf_tensor(tmp_path, qtype, quantize(weights(), qtype))
    held = hold(tensor, tensor.name)
    assert (held.bits, held.group_size, held.held_as) == (bits, 32, EXACT)
    assert held.scales.dtype == np.float16 and held.shape == (ROWS, COLS)
    np.testing.assert_array_equal(mlx_values(held), dequantize(tensor.data, qtype))


@pytest.mark.parametrize("kind, bits", [("Q4_K", 4), ("Q5_K", 5)])
def test_k_quants_differ_only_by_rounding_their_scales_to_f16(tmp_path, kind, bits):
    qtype = GGMLQuantizationType[kind]
    tensor = gguf_tensor(tmp_path, qtype, random_k_blocks(qtype))
    held = hold(tensor, tensor.name)
    assert (held.bits, held.group_size, held.held_as) == (bits, 32, SCALES_ROUNDED)
    expected = dequantize(tensor.data, qtype)
    got = mlx_values(held)
    # Each value is off by at most q_max × half an f16 ulp of its scale, plus half of its bias's.
    scales = np.repeat(held.scales.astype(np.float32), 32, axis=1)
    biases = np.repeat(held.biases.astype(np.float32), 32, axis=1)
    half_ulp = lambda x: np.spacing(np.abs(x).astype(np.float16)).astype(np.float32) / 2  # noqa: E731
    bound = (2**bits - 1) * half_ulp(scales) + half_ulp(biases) + np.spacing(np.abs(expected)) * 2
    assert np.all(np.abs(got - expected) <= bound)
    assert not np.array_equal(got, expected)  # the rounding is real, and bounded


def test_types_mlx_cannot_hold_are_requantized_with_at_least_their_bits(tmp_path):
    tensor = gguf_tensor(tmp_path, GGMLQuantizationType.Q6_K, random_k_blocks(GGMLQuantizationType.Q6_K))
    held = hold(tensor, tensor.name)
    assert (held.bits, held.held_as) == (8, REQUANTIZED)
    expected = dequantize(tensor.data, GGMLQuantizationType.Q6_K)
    # Within about one 8-bit step of each group's range: far below Q6_K's own 6-bit steps.
    step = (np.ptp(expected.reshape(ROWS, -1, 32), axis=-1) / 255).repeat(32, axis=1)
    assert np.all(np.abs(mlx_values(held) - expected) <= 1.5 * step)
    assert [requantize_bits(b) for b in (2.625, 3.4375, 4.5, 6.5625)] == [4, 4, 5, 8]


def test_an_f16_overflowing_bias_keeps_that_tensors_scales_in_f32(tmp_path):
    values = weights()
    values[0] *= 6e4 / np.abs(values[0]).max() * 8  # d near 60000: -8d is past f16's 65504
    tensor = gguf_tensor(tmp_path, GGMLQuantizationType.Q4_0, quantize(values, GGMLQuantizationType.Q4_0))
    held = hold(tensor, tensor.name)
    assert held.scales.dtype == np.float32
    np.testing.assert_array_equal(mlx_values(held), dequantize(tensor.data, GGMLQuantizationType.Q4_0))


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_packing_is_mlx_little_endian_bit_stream(bits):
    q = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 64))
    ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
    values = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(values), q)


def test_a_short_tensor_is_refused_naming_it(tmp_path):
    tensor = gguf_tensor(tmp_path, GGMLQuantizationType.Q8_0, quantize(weights(), GGMLQuantizationType.Q8_0))
    short = tensor._replace(data=tensor.data[: ROWS // 2])
    with pytest.raises(SourceError, match=r"tensor blk\.0\.ffn_up\.weight \(Q8_0, 48x512\) holds .* bytes"):
        hold(short, tensor.name)


def test_a_type_gguf_cannot_read_is_refused_naming_the_tensor(tmp_path):
    raw = np.zeros((ROWS, COLS // 32 * GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1][1]), dtype=np.uint8)
    tensor = gguf_tensor(tmp_path, GGMLQuantizationType.Q8_1, raw)
    with pytest.raises(SourceError, match=r"tensor blk\.0\.ffn_up\.weight uses Q8_1"):
        hold(tensor, tensor.name)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q6_K"])
def test_a_stack_of_expert_matrices_is_held_per_expert(tmp_path, kind):
    qtype = GGMLQuantizationType[kind]
    experts = 3
    raw = quantize(weights(), qtype) if kind == "Q8_0" else random_k_blocks(qtype)
    stack = np.stack([np.roll(raw, e, axis=0) for e in range(experts)])  # (experts, rows, bytes)
    tensor = gguf_tensor(tmp_path, qtype, stack)
    held = hold(tensor, tensor.name)
    assert held.shape == (experts, ROWS, COLS) and held.scales.shape[:2] == (experts, ROWS)
    expected = dequantize(tensor.data, qtype).reshape(experts, ROWS, COLS)
    got = np.stack([mlx_values(HeldTensor(held.packed[e], held.scales[e], held.biases[e], held.bits,
                                          held.group_size, held.gguf_type, held.held_as))
                    for e in range(experts)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=float(np.abs(expected).max()) * 2e-2)
    if kind == "Q8_0":
        np.testing.assert_array_equal(got, expected)
