"""Attention as layer ranges run it: per session in a batch pass (`session_rows.py`), and for a
few query rows on CUDA without a graph build for every key length.

mlx 0.32's CUDA `scaled_dot_product_attention` sends more than one query row to cuDNN, which
builds a graph per (query length, key length). Measured on an H100 (mlx 0.32.4): 45-65 ms
for a call whose key length is new, 0.1 ms when it repeats. A verify pass (w + 1 rows) and
the draft's catch-up (2 rows) come at a new key length every pass, so each paid the build on
every pass and stage; written as two matmuls and a softmax the same attention takes
0.2-0.4 ms. One row keeps mlx's vector kernel, long prompts keep cuDNN (built once per
prompt); Metal and the CPU keep mlx's kernels, which have no such cost. On the CPU kernel a
batch pass's one-row sessions attend in one call (`fused_ops.fused_sessions_attention`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import mlx.core as mx
from mlx_lm.models import base

from .fused_ops import fused_attention, fused_sessions_attention
from .session_rows import SessionRows

SMALL_QUERY_ROWS = 64  # at most a verify window's rows; prefill chunks stay on cuDNN

_small_query = False  # route 2..SMALL_QUERY_ROWS query rows through matmuls (on CUDA, or forced)


def on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def attention(queries: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float,
              mask: Any, sinks: mx.array | None = None) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention`, per session for a batch pass's rows, and as plain
    matmuls when few rows ask on CUDA."""
    if isinstance(cache, SessionRows):
        # Sessions side by side attend as matmuls: on CUDA a cuDNN graph per key length costs 50 ms.
        return cache.attend(attention, matmul_attention, queries, scale, sinks, fused_sessions_attention)
    rows = queries.shape[2]
    if sinks is None and not hasattr(cache, "bits"):  # on the CPU kernel: one task (fused_ops.py)
        fused = fused_attention(queries, keys, values, scale, mask)
        if fused is not None:
            return fused
    if (not _small_query or rows == 1 or rows > SMALL_QUERY_ROWS or sinks is not None
            or hasattr(cache, "bits")):
        return base.scaled_dot_product_attention(queries, keys, values, cache, scale=scale,
                                                 mask=mask, sinks=sinks)
    return matmul_attention(queries, keys, values, scale, mask)


def matmul_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                     mask: Any) -> mx.array:
    """Attention as two matmuls and a softmax, grouped-query heads included."""
    B, heads, rows, D = queries.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    # Grouped-query heads: (B, kv_heads, group, rows, D) against (B, kv_heads, 1, length, D).
    q = (queries * scale).reshape(B, kv_heads, heads // kv_heads, rows, D)
    scores = q @ keys[:, :, None].swapaxes(-1, -2)
    if isinstance(mask, str):  # "causal": row i sees the keys up to length - rows + i
        mask = mx.arange(length - rows, length)[:, None] >= mx.arange(length)[None]
    if mask is not None:
        if mask.ndim == 4:  # (B, 1 or heads, rows, length) -> the grouped layout
            mask = mask.reshape(mask.shape[0], -1, 1 if mask.shape[1] == 1 else heads // kv_heads,
                                rows, length)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask.astype(scores.dtype)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = weights @ values[:, :, None]
    return out.reshape(B, heads, rows, values.shape[-1])


def route_attention(module: ModuleType) -> bool:
    """Route an mlx-lm model module's attention through `attention`; False when the module does
    not call `scaled_dot_product_attention` (its batch passes then run session by session)."""
    global _small_query
    _small_query = _small_query or on_cuda()
    current = getattr(module, "scaled_dot_product_attention", None)
    if current is base.scaled_dot_product_attention:
        module.scaled_dot_product_attention = attention
    return getattr(module, "scaled_dot_product_attention", None) is attention


def use_small_query_attention(module: ModuleType, *, force: bool = False) -> None:
    """Route a module's attention through `attention`, few rows as matmuls (on CUDA, or `force`d)."""
    global _small_query
    _small_query = force or on_cuda()
    route_attention(module)


def restore_attention(module: ModuleType) -> None:
    """Undo `use_small_query_attention` (for tests)."""
    global _small_query
    _small_query = on_cuda()
    if getattr(module, "scaled_dot_product_attention", None) is attention:
        module.scaled_dot_product_attention = base.scaled_dot_product_attention
