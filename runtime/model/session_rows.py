"""Rows of several sessions through one forward pass (continuous batching).

A batch pass carries the rows of many sessions: one position each for sessions decoding
plainly, a draft window for those speculating, a chunk of prompt for those prefilling.
The rows are laid out as a batch of single positions, (rows, 1, hidden), so every linear
layer, norm and MLP runs once over all of them and nothing is padded; RoPE takes one
offset per batch entry, each row's own position. Attention is the only per-session part:
`SessionRows` stands in for a layer's cache, writes each session's keys and values into
that session's own cache, and `attend` gives each session's queries its own keys, under
its own mask, one attention call per session.

mlx-lm's blocks run unchanged: their attention rotates by `cache.offset`, calls
`cache.update_and_fetch`, then the module's `scaled_dot_product_attention`, which
`attention.route_attention` points at a function that hands a `SessionRows` cache back here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

Attend = Callable[..., mx.array]  # attention(queries, keys, values, cache, scale, mask, sinks)


class SessionRows:
    """One layer's caches of several sessions, standing in for a single cache during a batch pass."""

    def __init__(self, caches: list[Any], counts: list[int], window: int | None) -> None:
        self.caches = caches
        self.counts = counts
        self.window = window  # the layer's sliding attention window, None where it sees every position
        # Each row's absolute position: RoPE rotates batch entry i by offset[i].
        self.offset = mx.array([int(c.offset) + j for c, n in zip(caches, counts, strict=True)
                                for j in range(n)], dtype=mx.int32)
        self._fetched: list[tuple[mx.array, mx.array, Any]] = []

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write each session's rows (rows, kv_heads, 1, D) into its own cache; `attend` reads them."""
        self._fetched = []
        start = 0
        for cache, n in zip(self.caches, self.counts, strict=True):
            mask = cache.make_mask(n, window_size=self.window, return_array=False)  # before the update
            k = keys[start:start + n].swapaxes(0, 2)  # (1, kv_heads, n, D)
            v = values[start:start + n].swapaxes(0, 2)
            k, v = cache.update_and_fetch(k, v)
            self._fetched.append((k, v, mask))
            start += n
        return keys, values

    def attend(self, attention: Attend, queries: mx.array, scale: float, sinks: mx.array | None) -> mx.array:
        """Each session's queries (its rows of (rows, heads, 1, D)) against its own keys."""
        outs = []
        start = 0
        for cache, n, (keys, values, mask) in zip(self.caches, self.counts, self._fetched, strict=True):
            q = queries[start:start + n].swapaxes(0, 2)  # (1, heads, n, D)
            out = attention(q, keys, values, cache, scale, mask, sinks)
            outs.append(out.swapaxes(0, 2))
            start += n
        self._fetched = []
        return mx.concatenate(outs, axis=0)
