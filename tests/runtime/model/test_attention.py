"""Attention for a few query rows (the CUDA path): the same numbers as mlx's fused kernel."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import create_causal_mask

from layerline.packager.architectures import model_module
from layerline.runtime.model import attention as small


def qkv(rows: int, length: int, heads: int = 8, kv_heads: int = 2, dim: int = 32):
    mx.random.seed(rows * 1000 + length)
    return (mx.random.normal((1, heads, rows, dim)), mx.random.normal((1, kv_heads, length, dim)),
            mx.random.normal((1, kv_heads, length, dim)))


@pytest.mark.parametrize("rows,length", [(2, 2), (5, 37), (9, 9), (33, 100)])
@pytest.mark.parametrize("mask_kind", ["causal", "array", "window", "none"])
def test_small_query_attention_equals_the_fused_kernel(rows, length, mask_kind):
    q, k, v = qkv(rows, length)
    offset = length - rows
    mask = {"causal": "causal", "none": None,
            "array": create_causal_mask(rows, offset),
            "window": create_causal_mask(rows, offset, window_size=4)}[mask_kind]
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    got = small.attention(q, k, v, None, scale=0.2, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-5)


def test_a_range_with_small_query_attention_computes_the_same(smollm2_package):
    from layerline.runtime.decode.local_pipeline import LocalPipeline

    pipeline = LocalPipeline.load(smollm2_package, None, "f32", tokenizer=False)
    tokens = mx.array([[1, 5, 9, 13, 17, 21, 25, 29]])

    def logits() -> np.ndarray:
        caches = pipeline.make_cache()
        first = pipeline(tokens[:, :3], caches)  # prefill, then a verify-sized window
        return np.concatenate([np.array(first), np.array(pipeline(tokens[:, 3:], caches))], axis=1)

    plain = logits()
    module = model_module("llama")
    small.use_small_query_attention(module, force=True)
    try:
        assert module.scaled_dot_product_attention is small.attention
        patched = logits()
    finally:
        small.restore_attention(module)
    np.testing.assert_allclose(patched, plain, rtol=1e-4, atol=1e-4)
