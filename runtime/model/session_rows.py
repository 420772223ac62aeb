"""Rows of several sessions through one forward pass (continuous batching).

A batch pass carries the rows of many sessions: one position each for sessions decoding
plainly, a draft window for those speculating, a chunk of prompt for those prefilling.
The rows are laid out as a batch of single positions, (rows, 1, hidden), so every linear
layer, norm and MLP runs once over all of them and nothing is padded; RoPE takes one
offset per batch entry, each row's own position. Attention is the only per-session part:
`SessionRows` stands in for a layer's cache and writes each session's keys and values into
that session's own cache; `attend` gives each session's queries its own keys. While the
batch is small (rows x keys), that is one attention call over every session's keys side by
side, under a mask that keeps each row to its own session's (`joint_mask`), on a GPU where
a call per session costs its launch whatever its size. On a CPU, and beyond that size, one
call per session, under its own mask; except that on the CPU kernel the sessions that bring
one row each (plain decode steps) attend in one call over their own caches, read in place
(`fused_ops.fused_sessions_attention`), and only the others one call each.

mlx-lm's blocks run unchanged: their attention rotates by `cache.offset`, calls
`cache.update_and_fetch`, then the module's `scaled_dot_product_attention`, which
`attention.route_attention` points at a function that hands a `SessionRows` cache back here.

A session's rows may be the nodes of a tree (`tree.py`): each row then rotates by its node's
position and attends, under an array mask, to the prefix and its own ancestors. Sessions
with trees attend one call each.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate
from typing import Any

import mlx.core as mx
import numpy as np

from .tree import Tree, tree_mask

Attend = Callable[..., mx.array]  # attention(queries, keys, values, cache, scale, mask, sinks)
# sessions_attention(queries (S, H, 1, D), keys, values, scale, window): one row per session in one
# call, or None where it does not run
SessionsAttend = Callable[[mx.array, list[mx.array], list[mx.array], float, int | None], mx.array | None]


JOINT_CELLS = 1 << 20  # rows x keys of every session, up to which sessions attend in one call
# On a CPU each score costs its arithmetic, and one call over every session's keys computes each
# row against all of them: measured slower than a call per session (SmolLM2, 16 sessions of 41
# positions: 110 against 80 ms a pass).
JOINT_ON_CPU = False


def joint_mask(caches: list[Any], counts: list[int], window: int | None) -> mx.array | None:
    """Which of every session's keys each row of a batch pass may see, for attention in one call
    over all sessions' keys side by side: its own session's, up to its own position (and within
    `window`). None when that many scores would cost more than a call per session.

    Read before the pass's updates (from `caches`, one layer's): it holds for every layer of
    the same window, whose caches are at the same positions."""
    sessions = list(zip(caches, counts, strict=True))
    offsets = [int(cache.offset) for cache in caches]
    starts = [key_start(cache, n) for cache, n in sessions]
    lengths = [offset + n - start for offset, n, start in zip(offsets, counts, starts, strict=True)]
    if sum(counts) * sum(lengths) > JOINT_CELLS or (mx.default_device() == mx.cpu and not JOINT_ON_CPU):
        return None
    key_session = np.repeat(np.arange(len(counts)), lengths)
    key_pos = np.concatenate([np.arange(s, s + k) for s, k in zip(starts, lengths, strict=True)])
    row_session = np.repeat(np.arange(len(counts)), counts)
    row_pos = np.concatenate([np.arange(o, o + n) for o, n in zip(offsets, counts, strict=True)])
    mask = (key_session[None] == row_session[:, None]) & (key_pos[None] <= row_pos[:, None])
    if window is not None:
        mask &= key_pos[None] > row_pos[:, None] - window
    return mx.array(mask)


def tree_masks(caches: list[Any], counts: list[int], window: int | None,
               trees: list[Tree | None]) -> list[mx.array | None]:
    """Each tree session's mask over its keys (`tree.tree_mask`), None for a chain; read before
    the pass's updates (from one layer's caches), it holds for every layer of the same window."""
    return [None if tree is None else tree_mask(tree, n, key_start(cache, n), window)
            for cache, n, tree in zip(caches, counts, trees, strict=True)]


def key_start(cache: Any, rows: int) -> int:
    """The slot of the first key a cache's next update of `rows` returns (a sliding window's
    drops the oldest; mlx-lm's KVCache returns every slot)."""
    return cache.key_start(rows) if hasattr(cache, "key_start") else 0


class SessionRows:
    """One layer's caches of several sessions, standing in for a single cache during a batch pass."""

    def __init__(self, caches: list[Any], counts: list[int], window: int | None,
                 joint: mx.array | None = None, trees: list[Tree | None] | None = None,
                 masks: list[mx.array | None] | None = None) -> None:
        self.caches = caches
        self.counts = counts
        self.window = window  # the layer's sliding attention window, None where it sees every position
        self.joint = joint  # `joint_mask`: every session attends in one call (None: one call each)
        self.trees = trees or [None] * len(caches)  # a session's tree, None for a chain of rows
        self.tree_masks = masks or [None] * len(caches)  # `tree_masks`: a tree session's mask
        self._bounds = list(accumulate(counts))[:-1]  # where each session's rows end but the last
        # Each row's absolute position: RoPE rotates batch entry i by offset[i].
        self.offset = mx.array([p for c, n, tree in zip(caches, counts, self.trees, strict=True)
                                for p in _positions(c, n, tree)], dtype=mx.int32)
        self._fetched: list[tuple[mx.array, mx.array, Any]] = []

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write each session's rows (rows, kv_heads, 1, D) into its own cache; `attend` reads them."""
        self._fetched = []
        for cache, n, mask_of_tree, k, v in zip(self.caches, self.counts, self.tree_masks,
                                              self._split(keys), self._split(values), strict=True):
            # The mask before the update, which moves the cache on (the joint mask covers all).
            if mask_of_tree is not None:
                mask = mask_of_tree
            elif self.joint is None:
                mask = cache.make_mask(n, window_size=self.window, return_array=False)
            else:
                mask = None
            k, v = cache.update_and_fetch(_to_session(k, n), _to_session(v, n))
            self._fetched.append((k, v, mask))
        return keys, values

    def attend(self, attention: Attend, joint_attention: Callable[..., mx.array], queries: mx.array,
               scale: float, sinks: mx.array | None,
               sessions_attention: SessionsAttend | None = None) -> mx.array:
        """Each session's queries (its rows of (rows, heads, 1, D)) against its own keys: in one
        call over all sessions' keys side by side under the joint mask, or one call each, but
        the one-row sessions' in one `sessions_attention` call where it runs."""
        fetched, self._fetched = self._fetched, []
        if self.joint is not None and sinks is None:
            keys = mx.concatenate([k for k, _, _ in fetched], axis=2)
            values = mx.concatenate([v for _, v, _ in fetched], axis=2)
            out = joint_attention(queries.swapaxes(0, 2), keys, values, scale, self.joint)
            return out.swapaxes(0, 2)
        # A session's one row sees its cache's keys, or the last `window` of them.
        sessions = enumerate(zip(self.counts, self.trees, fetched, strict=True))
        one_row = [i for i, (n, tree, (_, _, mask)) in sessions
                   if n == 1 and tree is None and (mask is None or self.window is not None)]
        together = None
        if one_row and sinks is None and sessions_attention is not None:
            every = len(one_row) == len(self.counts)
            rows = queries if every else queries[mx.array([self._first_row(i) for i in one_row])]
            together = sessions_attention(rows, [fetched[i][0] for i in one_row],
                                          [fetched[i][1] for i in one_row], scale, self.window)
            if together is not None and every:
                return together
        position = {session: j for j, session in enumerate(one_row)} if together is not None else {}
        outs = []
        pieces = zip(self.caches, self.counts, self._split(queries), fetched, strict=True)
        for i, (cache, n, q, (keys, values, mask)) in enumerate(pieces):
            if i in position:
                outs.append(together[position[i]:position[i] + 1])
                continue
            out = attention(_to_session(q, n), keys, values, cache, scale, mask, sinks)
            outs.append(_to_session(out, n))  # (1, heads, n, D) -> (n, heads, 1, D): the same swap
        return mx.concatenate(outs, axis=0)

    def _first_row(self, session: int) -> int:
        """The batch pass's index of a session's first row."""
        return self._bounds[session - 1] if session else 0

    def _split(self, rows: mx.array) -> list[mx.array]:
        """Each session's rows of a (rows, ...) array, in one split."""
        return mx.split(rows, self._bounds, axis=0) if self._bounds else [rows]


def _positions(cache: Any, rows: int, tree: Tree | None) -> list[int]:
    """The absolute positions of a session's rows: after its cache's, or its tree nodes'."""
    if tree is None:
        return list(range(int(cache.offset), int(cache.offset) + rows))
    return tree.positions()[len(tree) - rows:]


def _to_session(rows: mx.array, n: int) -> mx.array:
    """A session's n rows laid out as a batch (n, H, 1, D) <-> as positions (1, H, n, D)."""
    return rows if n == 1 else rows.swapaxes(0, 2)
