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
from itertools import accumulate
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
        for cache, n, k, v in zip(self.caches, self.counts, self._split(keys), self._split(values),
                                  strict=True):
            mask = cache.make_mask(n, window_size=self.window, return_array=False)  # before the update
            k, v = cache.update_and_fetch(_to_session(k, n), _to_session(v, n))
            self._fetched.append((k, v, mask))
        return keys, values

    def attend(self, attention: Attend, queries: mx.array, scale: float, sinks: mx.array | None) -> mx.array:
        """Each session's queries (its rows of (rows, heads, 1, D)) against its own keys."""
        outs = []
        for cache, n, q, (keys, values, mask) in zip(self.caches, self.counts, self._split(queries),
                                                     self._fetched, strict=True):
            out = attention(_to_session(q, n), keys, values, cache, scale, mask, sinks)
            outs.append(_to_session(out, n))  # (1, heads, n, D) -> (n, heads, 1, D): the same swap
        self._fetched = []
        return mx.concatenate(outs, axis=0)

    def _split(self, rows: mx.array) -> list[mx.array]:
        """Each session's rows of a (rows, ...) array, in one split."""
        return mx.split(rows, self._bounds, axis=0) if self._bounds else [rows]

    @property
    def _bounds(self) -> list[int]:
        return list(accumulate(self.counts))[:-1]


def _to_session(rows: mx.array, n: int) -> mx.array:
    """A session's n rows laid out as a batch (n, H, 1, D) <-> as positions (1, H, n, D)."""
    return rows if n == 1 else rows.swapaxes(0, 2)
