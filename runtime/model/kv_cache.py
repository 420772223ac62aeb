"""KV caches per session: rollback to any position, snapshot/restore, and an LRU store.

Rollback protocol, whatever the cache kind:

- `truncate(p)` forgets every position >= p. mlx-lm's `KVCache` writes at
  `offset` and reads only `[:offset]`, so lowering `offset` is a complete
  rollback and costs nothing; slicing the buffers instead would make the next
  step copy the whole cache, on every rejected draft. The stale rows past
  `offset` never come back, because nothing here round-trips a cache through
  mlx-lm's `state` setter: snapshots copy only `[:offset]`.
- Caches that cannot trim (a `RotatingKVCache` that has wrapped around its
  window) refuse `truncate`; take `snapshot()` before the positions that may be
  rejected, then `restore()` and replay the accepted tokens.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from layerline.errors import SessionError

log = logging.getLogger("layerline.runtime")


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
        return position == self.length or all(c.is_trimmable() for c in self.caches)

    def truncate(self, position: int) -> None:
        """Forget every position >= `position`, so the next token is fed at `position`."""
        if not 0 <= position <= self.length:
            raise SessionError(
                f"cannot truncate a cache of {self.length} positions to position {position}",
                hint=f"truncate to a position between 0 and {self.length}",
            )
        if position == self.length:
            return
        if not all(c.is_trimmable() for c in self.caches):
            raise SessionError(
                f"this session's rotating cache has wrapped past its window ({self.length} "
                f"positions), so it cannot roll back to {position}",
                hint="snapshot() before feeding tokens that may be rejected, then restore() and "
                "replay the accepted ones",
            )
        for cache in self.caches:
            cache.trim(cache.offset - position)

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
    """The caches of many sessions on one layer range, least recently used evicted first."""

    def __init__(
        self,
        make_caches: Callable[[], list[Any]],
        *,
        max_sessions: int = 16,
        max_bytes: int | None = None,
    ) -> None:
        if max_sessions < 1:
            raise SessionError(f"max_sessions must be at least 1, got {max_sessions}")
        self._make_caches = make_caches
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._sessions: OrderedDict[str, RangeCache] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._sessions.values())

    def create(self, session_id: str) -> RangeCache:
        """A fresh, empty cache for a new session (evicting others if over a cap)."""
        with self._lock:
            if session_id in self._sessions:
                raise SessionError(
                    f"session {session_id!r} already exists",
                    hint="drop it first, or use a new session id",
                )
            return self._add(session_id)

    def get(self, session_id: str) -> RangeCache:
        """The cache of a live session, marked most recently used."""
        with self._lock:
            cache = self._sessions.get(session_id)
            if cache is None:
                raise SessionError(
                    f"no session {session_id!r} here (never created, dropped, or evicted)",
                    hint="create the session again and re-feed its prefix from position 0",
                )
            self._sessions.move_to_end(session_id)
            return cache

    def get_or_create(self, session_id: str) -> RangeCache:
        """The session's cache, creating it if it does not exist."""
        with self._lock:
            cache = self._sessions.get(session_id)
            if cache is not None:
                self._sessions.move_to_end(session_id)
                return cache
            return self._add(session_id)

    def drop(self, session_id: str) -> bool:
        """Forget a session; False if there was none."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def enforce_caps(self, keep: str | None = None) -> list[str]:
        """Evict least recently used sessions (never `keep`) until within the caps."""
        with self._lock:
            return self._evict(keep)

    def _add(self, session_id: str) -> RangeCache:
        cache = RangeCache(self._make_caches())
        self._sessions[session_id] = cache
        self._evict(keep=session_id)
        return cache

    def _evict(self, keep: str | None) -> list[str]:
        evicted = []
        for session_id in list(self._sessions):
            over_count = len(self._sessions) > self.max_sessions
            over_bytes = self.max_bytes is not None and (
                sum(c.nbytes for c in self._sessions.values()) > self.max_bytes
            )
            if not (over_count or over_bytes):
                break
            if session_id == keep:
                continue
            del self._sessions[session_id]
            evicted.append(session_id)
            log.info("session=%s evicted reason=%s", session_id, "count" if over_count else "bytes")
        return evicted
