"""KV caches per session: rollback to any position, snapshot/restore, and a bounded store.

Rollback protocol, whatever the cache kind:

- `truncate(p)` forgets every position >= p. mlx-lm's `KVCache` writes at
  `offset` and reads only `[:offset]`, so lowering `offset` is a complete
  rollback and costs nothing; slicing the buffers instead would make the next
  step copy the whole cache, on every rejected draft. The stale rows past
  `offset` never come back, because nothing here round-trips a cache through
  mlx-lm's `state` setter: snapshots copy only `[:offset]`.
- Sliding-window layers (Gemma 2/3, Mistral) use `SlidingWindowCache`: it keeps
  the window plus the most positions one speculation step can reject, so it
  rolls back like any cache, and so does a stage given a frame's `start_pos`.
- After a tree of rows (`tree.py`) the cache holds every node in slots from the tree's base;
  `keep_path` moves one root-to-node path's keys and values into place (no recompute) and
  forgets the rest, so the cache is as if that path alone had been fed.
- Caches that cannot trim (mlx-lm's `RotatingKVCache` once it has wrapped
  around its window) refuse `truncate`; take `snapshot()` before the positions
  that may be rejected, then `restore()` and replay the accepted tokens.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from layerline.errors import SessionError, SessionLimitError
from layerline.packager.window_spec import MAX_WINDOW

from .session_limit import DEFAULT_MAX_SESSIONS

log = logging.getLogger("layerline.runtime")

# Positions a sliding-window cache keeps beyond its window, so that it can roll back: more than
# one speculation step can reject (a frame verifies at most MAX_WINDOW drafts + 1 positions).
ROLLBACK_POSITIONS = 2 * MAX_WINDOW


class SlidingWindowCache:
    """Keys and values of a sliding-window attention layer that, unlike mlx-lm's
    `RotatingKVCache`, can roll back.

    It holds positions [start, offset) in order, in a buffer that grows by `step`
    rows; when the buffer is full it keeps only the last `window - 1 + rollback`
    positions (all the window can still reach after a rollback of `rollback`), so
    memory stays bounded by the window while `trim` stays exact. Its mask lets each
    query see the `window` positions ending at its own, as mlx-lm's sliding masks do.
    """

    step = 256

    def __init__(self, window: int, rollback: int = ROLLBACK_POSITIONS) -> None:
        self.window = window
        self.rollback = rollback
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # absolute position of the next token
        self.start = 0  # absolute position of the buffer's first row

    def _start_after(self, length: int) -> tuple[int, bool]:
        """(first position held once `length` more are added, whether the buffer is rebuilt)."""
        held = self.offset - self.start
        if self.keys is None or held + length > self.keys.shape[2]:
            return self.offset - min(held, self.window - 1 + self.rollback), True
        return self.start, False

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, S, _ = keys.shape
        start, rebuild = self._start_after(S)
        if rebuild:
            kept = self.offset - start
            rows = (kept + S + self.step - 1) // self.step * self.step
            new_keys = mx.zeros((B, H, rows, keys.shape[3]), keys.dtype)
            new_values = mx.zeros((B, H, rows, values.shape[3]), values.dtype)
            if kept:
                held = self.offset - self.start
                new_keys[..., :kept, :] = self.keys[..., held - kept:held, :]
                new_values[..., :kept, :] = self.values[..., held - kept:held, :]
            self.keys, self.values, self.start = new_keys, new_values, start
        held = self.offset - self.start
        self.keys[..., held:held + S, :] = keys
        self.values[..., held:held + S, :] = values
        self.offset += S
        return self.keys[..., :held + S, :], self.values[..., :held + S, :]

    def key_start(self, N: int) -> int:
        """The position of the first key the next update of N positions returns."""
        return self._start_after(N)[0]

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> Any:
        """The mask of N queries from `offset` over the keys the next update returns."""
        window = window_size or self.window
        start, _ = self._start_after(N)
        if N == 1 and self.offset + 1 - start <= window:
            return None  # one query that sees every position held
        queries = mx.arange(self.offset, self.offset + N)[:, None]
        keys = mx.arange(start, self.offset + N)[None]
        return (keys <= queries) & (keys > queries - window)

    def can_trim(self, n: int) -> bool:
        """Whether the window of the position `n` back is still held in full (or n empties it)."""
        return n == self.offset or 0 <= n <= self.offset - self.start and (
            self.start == 0 or self.offset - n - self.window + 1 >= self.start)

    def is_trimmable(self) -> bool:
        return self.can_trim(min(self.rollback, self.offset - self.start))

    def trim(self, n: int) -> int:
        if not self.can_trim(n):
            raise SessionError(f"a sliding-window cache at position {self.offset} cannot roll back "
                               f"{n} positions (it keeps {self.rollback} beyond its window)")
        self.offset -= n
        if self.offset == 0:
            self.keys = self.values = None
            self.start = 0
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else int(self.keys.nbytes + self.values.nbytes)


def _keep_slots(cache: Any, base: int, slots: list[int]) -> None:
    """Move a layer cache's keys and values of `slots` (ascending, from `base`) to slots base,
    base + 1, ... and forget every slot after them."""
    start = cache.start if isinstance(cache, SlidingWindowCache) else 0  # slot of the buffer's row 0
    if slots != list(range(base, base + len(slots))):
        index = mx.array([s - start for s in slots], dtype=mx.int32)
        first = base - start
        cache.keys[..., first:first + len(slots), :] = cache.keys[..., index, :]
        cache.values[..., first:first + len(slots), :] = cache.values[..., index, :]
    cache.offset = base + len(slots)


def _can_trim(cache: Any, n: int) -> bool:
    can_trim = getattr(cache, "can_trim", None)
    return can_trim(n) if can_trim is not None else cache.is_trimmable()


@dataclass(frozen=True)
class CacheSnapshot:
    length: int
    caches: tuple[Any, ...]  # private copies; never handed to a model


def _detached(cache: Any) -> Any:
    """A copy of `cache` that shares no mutable array with it."""
    clone = copy.copy(cache)
    if isinstance(cache, KVCache):
        if cache.keys is not None:
            clone.keys = cache.keys[..., : cache.offset, :]
            clone.values = cache.values[..., : cache.offset, :]
        return clone
    for name, value in vars(cache).items():
        if isinstance(value, mx.array):
            setattr(clone, name, mx.array(value))
        elif isinstance(value, list):
            setattr(clone, name, [mx.array(v) if isinstance(v, mx.array) else v for v in value])
    return clone


def _arrays(cache: Any) -> list[mx.array]:
    found = []
    for value in vars(cache).values():
        if isinstance(value, mx.array):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, mx.array))
    return found


class RangeCache:
    """The per-layer caches of one session on one layer range."""

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches  # passed to the layers; restore() replaces its items in place

    @property
    def length(self) -> int:
        """Positions the cache holds (the absolute position of the next token)."""
        return int(self.caches[0].offset) if self.caches else 0

    @property
    def nbytes(self) -> int:
        return sum(int(c.nbytes) for c in self.caches)

    def can_truncate(self, position: int) -> bool:
        """Whether `truncate(position)` would succeed."""
        if not 0 <= position <= self.length:
            return False
        return position == self.length or all(_can_trim(c, c.offset - position) for c in self.caches)

    def truncate(self, position: int) -> None:
        """Forget every position >= `position`, so the next token is fed at `position`."""
        if not 0 <= position <= self.length:
            raise SessionError(
                f"cannot truncate a cache of {self.length} positions to position {position}",
                hint=f"truncate to a position between 0 and {self.length}",
            )
        if position == self.length:
            return
        if not all(_can_trim(c, c.offset - position) for c in self.caches):
            raise SessionError(
                f"this session's sliding-window cache has moved past its window ({self.length} "
                f"positions), so it cannot roll back to {position}",
                hint="snapshot() before feeding tokens that may be rejected, then restore() and "
                "replay the accepted ones",
            )
        for cache in self.caches:
            cache.trim(cache.offset - position)

    def can_keep_path(self, base: int, path: Sequence[int]) -> bool:
        """Whether `keep_path(base, path)` would succeed."""
        if not path or any(b <= a for a, b in itertools.pairwise(path)) or path[0] < 0:
            return False
        if base + path[-1] >= self.length:
            return False
        # A sliding window's oldest slots may be gone: the path's prefix must still be held.
        return all(base >= c.start for c in self.caches if isinstance(c, SlidingWindowCache))

    def keep_path(self, base: int, path: Sequence[int]) -> None:
        """Of a tree stored from slot `base`, keep the nodes `path` (root first) at base, base + 1,
        ... and forget every other slot >= base: the cache is then as if the path alone had been
        fed after the prefix."""
        if not self.can_keep_path(base, path):
            raise SessionError(
                f"cannot keep the tree path {list(path)} from slot {base} of a cache of {self.length} slots",
                hint="give the path of a tree this cache holds: node indices in increasing order")
        for cache in self.caches:
            _keep_slots(cache, base, [base + node for node in path])

    def snapshot(self) -> CacheSnapshot:
        """A copy of the cache as it is now, for `restore`."""
        caches = tuple(_detached(c) for c in self.caches)
        mx.eval([a for c in caches for a in _arrays(c)])
        return CacheSnapshot(length=self.length, caches=caches)

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Put the cache back as it was at `snapshot` (which stays valid for another restore)."""
        if len(snapshot.caches) != len(self.caches):
            raise SessionError(
                f"snapshot of {len(snapshot.caches)} layers cannot restore a cache of "
                f"{len(self.caches)} layers",
                hint="restore a snapshot taken from the same session",
            )
        for i, saved in enumerate(snapshot.caches):
            self.caches[i] = _detached(saved)


class SessionStore:
    """The caches of many sessions on one layer range, at most `max_sessions` at once.

    A full store refuses a new session (SessionLimitError) rather than evict one: a
    session is in use until its request ends, and evicting it would fail that request
    midway. Stage 0 admits no more requests than the stores hold.
    """

    def __init__(self, make_caches: Callable[[], list[Any]], *,
                 max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        if max_sessions < 1:
            raise SessionError(f"max_sessions must be at least 1, got {max_sessions}")
        self._make_caches = make_caches
        self.max_sessions = max_sessions
        self._sessions: dict[str, RangeCache] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def nbytes(self) -> int:
        """Bytes every session's caches hold."""
        with self._lock:
            return sum(c.nbytes for c in self._sessions.values())

    def create(self, session_id: str) -> RangeCache:
        """A fresh, empty cache for a new session."""
        with self._lock:
            if session_id in self._sessions:
                raise SessionError(
                    f"session {session_id!r} already exists",
                    hint="drop it first, or use a new session id",
                )
            return self._add(session_id)

    def get(self, session_id: str) -> RangeCache:
        """The cache of a live session."""
        with self._lock:
            cache = self._sessions.get(session_id)
            if cache is None:
                raise SessionError(
                    f"no session {session_id!r} here (never created, or dropped)",
                    hint="create the session again and re-feed its prefix from position 0",
                )
            return cache

    def get_or_create(self, session_id: str) -> RangeCache:
        """The session's cache, creating it if it does not exist."""
        with self._lock:
            cache = self._sessions.get(session_id)
            return cache if cache is not None else self._add(session_id)

    def drop(self, session_id: str) -> bool:
        """Forget a session; False if there was none."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def _add(self, session_id: str) -> RangeCache:
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitError(
                f"this stage holds its most sessions ({self.max_sessions}); session {session_id!r} "
                "cannot start", hint="retry when a request ends, or raise --max-sessions")
        cache = RangeCache(self._make_caches())
        self._sessions[session_id] = cache
        return cache
